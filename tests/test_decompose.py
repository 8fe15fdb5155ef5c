"""decompose(): function preservation on ResNets (BatchNorm2d / FrozenBatchNorm2d) and Faster R-CNN, the channel
graph (which layers are channel-prunable), detector scope, and bad input."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import edp_det
from edp_det import CompressedAwareConv2d, decompose, is_decomposed, iter_blocks

from _core_helpers import DET_KW, assert_det_close, build, cached, det_image, one_thread, rel_err  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _convs(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_bn_float64_exact(name):
    original, model = cached(name, num_classes=10)
    # every conv of the original was replaced (same qualified names)
    assert sorted(n for n, _ in iter_blocks(model)) == sorted(_convs(original))
    assert not any(isinstance(m, nn.Conv2d) and not n.endswith((".basis", ".coeff"))
                   for n, m in model.named_modules())
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    ref = original(x)
    assert rel_err(ref, model(x)) <= 1e-10
    # BN was really non-trivial: disabling it changes the output
    assert any(isinstance(m, nn.BatchNorm2d) and (m.running_var - 1).abs().max() > 0.1 for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_bn_float32_within_1e4(name):
    original, model = cached(name, dtype=torch.float32, num_classes=10)
    assert model.fc.weight.dtype == torch.float32
    assert all(b.coeff.weight.dtype == torch.float32 for _, b in iter_blocks(model))
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(original(x), model(x)) <= 1e-4


def test_resnet50_frozen_bn_folded_and_exact():
    original, model = cached("resnet50", num_classes=10, norm="frozen")
    assert isinstance(original.layer1[0].bn1, FrozenBatchNorm2d)
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    assert rel_err(original(x), model(x)) <= 1e-10
    # folded: every FrozenBatchNorm2d after a decomposed conv became an Identity, its shift lives on β's bias
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    for name, b in iter_blocks(model):
        assert b.coeff.bias is not None, name
        assert b.norm_name is None, name
    assert isinstance(model.layer1[0].bn1, nn.Identity) and isinstance(model.layer1[0].downsample[1], nn.Identity)
    assert model.conv1.channel_prunable and model.layer1[0].conv2.channel_prunable


def test_resnet_frozen_bn_without_folding_is_exact():
    model = build("resnet18", num_classes=10, norm="frozen")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    decompose(model, fold_frozen_bn=False, channel_prune=False, init="identity")   # identity: cheap
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert rel_err(ref, model(x)) <= 1e-10


def test_identity_init_whole_network_exact():
    model = build("resnet18", num_classes=10)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    decompose(model, init="identity")
    assert rel_err(ref, model(x)) <= 1e-10
    b = model.layer2[0].conv2
    assert torch.equal(b.coeff.weight.view(128, 128), torch.eye(128, dtype=torch.float64))


def test_fasterrcnn_r50_fpn_detector_scope_exact():
    """R50-FPN decomposed with scope="detector": body + FPN (8 convs) + RPN head conv; body features and the full
    detector outputs are unchanged."""
    original, model = cached("fasterrcnn", decompose_kw={"scope": "detector"}, **DET_KW)
    names = {n for n, _ in iter_blocks(model)}
    body = {n for n in _convs(original) if n.startswith("backbone.body.")}
    fpn = {n for n in _convs(original) if n.startswith("backbone.fpn.")}
    rpn = {"rpn.head.conv.0.0"}
    assert len(body) == 53 and len(fpn) == 8
    assert names == body | fpn | rpn
    assert isinstance(model.rpn.head.cls_logits, nn.Conv2d)            # prediction convs stay plain
    for n in fpn | rpn:
        assert not model.get_submodule(n).channel_prunable, n
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    a, b = original.backbone.body(x), model.backbone.body(x)
    assert list(a) == list(b) == ["0", "1", "2", "3"]
    for k in a:
        assert a[k].shape == b[k].shape
        assert rel_err(a[k], b[k]) <= 1e-10
    fa, fb = original.backbone(x), model.backbone(x)
    assert all(rel_err(fa[k], fb[k]) <= 1e-10 for k in fa)
    img = det_image()
    assert_det_close(original([img]), model([img]), 1e-9)


def test_fasterrcnn_backbone_scope_only_touches_body():
    model = build("fasterrcnn", depth=18, **DET_KW)
    img = det_image(1)
    ref = model([img])
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    body_ref = model.backbone.body(x)
    decompose(model, init="identity")                 # scope="backbone"
    names = [n for n, _ in iter_blocks(model)]
    assert len(names) == 20 and all(n.startswith("backbone.body.") for n in names)
    body = model.backbone.body(x)
    assert all(rel_err(body_ref[k], body[k]) <= 1e-10 for k in body_ref)
    assert_det_close(ref, model([img]), 1e-9)


def _prunable(model):
    return {n for n, b in iter_blocks(model) if b.channel_prunable}


def test_channel_prune_auto_marks_bottleneck_layers():
    _, model = cached("resnet50", num_classes=10)
    expected = {"conv1"}
    for li, n in zip(range(1, 5), (3, 4, 6, 3)):
        for bi in range(n):
            expected |= {f"layer{li}.{bi}.conv1", f"layer{li}.{bi}.conv2"}
    assert _prunable(model) == expected
    # norm_name points at the BN right after each prunable conv
    for n, b in iter_blocks(model):
        if b.channel_prunable:
            expected_norm = "bn1" if n == "conv1" else n[:-len("convX")] + "bn" + n[-1]
            assert b.norm_name == expected_norm
            assert isinstance(model.get_submodule(b.norm_name), nn.BatchNorm2d)
    # residual-feeding convs are low-rank only
    for n in ("layer1.0.conv3", "layer1.0.downsample.0", "layer4.2.conv3"):
        assert not model.get_submodule(n).channel_prunable


def test_channel_prune_auto_marks_basicblock_layers():
    _, model = cached("resnet18", num_classes=10)
    expected = {f"layer{li}.{bi}.conv1" for li in range(1, 5) for bi in range(2)}
    # layer1.0 of a ResNet-18 has no downsample: the stem output feeds the residual add → not prunable
    assert _prunable(model) == expected
    assert not model.conv1.channel_prunable and not model.layer2[0].downsample[0].channel_prunable


def test_channel_prune_off_and_detector_stem():
    model = build("resnet18", num_classes=10)
    decompose(model, channel_prune=False, init="identity")
    assert _prunable(model) == set()
    _, det = cached("fasterrcnn", decompose_kw={"scope": "detector"}, **DET_KW)
    p = _prunable(det)
    assert "backbone.body.conv1" in p and "backbone.body.layer3.5.conv2" in p
    assert "backbone.body.layer3.5.conv3" not in p and len(p) == 1 + 2 * 16
    with pytest.raises(ValueError):
        decompose(nn.Sequential(nn.Conv2d(3, 3, 1)), channel_prune="maybe")


def test_double_decompose_raises():
    _, model = cached("resnet18", num_classes=10)
    assert is_decomposed(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already decomposed"):
        decompose(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)),
    lambda: torchvision.models.mobilenet_v2(weights=None),
    lambda: nn.Linear(3, 4),
], ids=["sequential", "mobilenet_v2", "linear"])
def test_unsupported_model_raises_type_error(make):
    model = make()
    with pytest.raises(TypeError, match="unsupported model"):
        decompose(model)
    assert not is_decomposed(model)


def test_detector_scope_on_classifier_and_bad_scope():
    model = build("resnet18", num_classes=10)
    for kw in ({"scope": "detector"}, {"scope": "everything"}, {"forward_mode": "fast"}, {"init": "random"}):
        with pytest.raises(ValueError):
            decompose(model, **kw)
        assert not is_decomposed(model), kw


def test_decompose_follows_dtype_and_keeps_blocks_trainable():
    _, model = cached("resnet18", num_classes=10)
    for _, b in iter_blocks(model):
        assert isinstance(b, CompressedAwareConv2d)
        assert b.basis.weight.dtype == torch.float64 and b.basis.weight.requires_grad
        assert b.orig_in_channels == b.in_channels and b.orig_out_channels == b.out_channels
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.train()
    model(x).sum().backward()
    assert all(b.coeff.weight.grad is not None and b.basis.weight.grad is not None for _, b in iter_blocks(model))


def test_build_model_frozen_resnet_is_registry_built():
    m = edp_det.build_model("resnet50", norm="frozen", num_classes=5)
    assert m.edp_arch == {"name": "resnet50", "kwargs": {"norm": "frozen", "num_classes": 5}}
