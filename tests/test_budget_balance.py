"""The FLOPs budget cuts layers in proportion: no layer is gutted to a 1-channel / rank-1 bottleneck at a moderate
target (the failure mode of scoring groups by norm per FLOP saved, which wrecked a detector after PM)."""
import torch
import torchvision

import edp_det


def test_moderate_target_spreads_over_layers():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    edp_det.decompose(m)
    rep = edp_det.prune_and_merge(m, flops_target=0.4, input_size=(3, 64, 64))
    assert 0.40 <= rep.achieved_r_flops <= 0.41
    for layer in rep.layers:
        c_in, r, c_out = layer.before
        _, r2, c_out2 = layer.after
        assert c_out2 >= 0.25 * c_out, (layer.name, layer.before, layer.after)
        if not layer.merged:
            assert r2 >= 0.1 * r, (layer.name, layer.before, layer.after)
    # the cut reaches both early (high-resolution) and late layers
    changed = {l.name.split(".")[0] for l in rep.layers if l.after != l.before or l.merged is False}
    assert {"layer1", "layer4"} <= changed
