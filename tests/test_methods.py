"""Comparison methods (l1_filter, slimming, svd, lrs, admm_lrs) and the EDP variants behind the method interface:
each reaches its FLOPs target (recounted on the real model), exactness where claimed, LRS masks survive optimizer
steps, frozen-BN slimming, save/load round trips, bad input. CPU only, tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det import CompressedAwareConv2d, build_model, count_flops, load_compressed, save_compressed
from edp_det.ops.graph import build_channel_graph
from edp_det.ops.layers import FixedStatBatchNorm2d, LowRankSparseConv2d, MaskedConv2d
from edp_det.ops.surgery import LowRankConv2d
from edp_det.methods import METHODS, build_method
from edp_det.methods.lrs import allocate_lowrank_sparse
from edp_det.models import MODEL_REGISTRY, register_model
from edp_det.deploy.serialization import apply_spec, architecture_spec

from _core_helpers import one_thread, randomize_norms  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "_test_tiny_bottleneck"
SIZE = (3, 32, 32)


if TINY not in MODEL_REGISTRY:
    @register_model(TINY)
    def _tiny_bottleneck(num_classes: int = 10, norm: str = "bn") -> nn.Module:
        """A one-block-per-stage Bottleneck ResNet with 8/16/32/64-wide inner convs: every graph case (prunable
        stem with two consumers, conv1/conv2 rows, residual-tied conv3/downsample) at a fraction of a ResNet-18."""
        norm_layer = {"bn": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}[norm]
        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=8, norm_layer=norm_layer)


def tiny(dtype=torch.float64, seed: int = 0, norm: str = "bn") -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(TINY, norm=norm)
    randomize_norms(model, seed + 1)
    return model.to(dtype).eval()


def cfg(target=0.4, **args) -> dict:
    return {"epoch_es": 1, "flops_target": target, **args}


def _calibrate(method, model, n=2):
    g = torch.Generator().manual_seed(0)
    dt = next(model.parameters()).dtype
    method.calibrate(model, [(torch.randn(3, *SIZE, generator=g, dtype=dt), None) for _ in range(n)], "cpu")


def _compress(name, model, target=0.4, **args):
    method = build_method(name, cfg(target, **args), total_epochs=2)
    model = method.prepare(model)
    if method.calibration_batches:
        _calibrate(method, model)
    report = method.prune(model, SIZE).report
    return method, model, report


FAST_ARGS = {"admm_lrs": {"admm_iters": 2, "admm_samples": 256}}


@pytest.mark.parametrize("name,target", [("l1_filter", 0.4), ("slimming", 0.4), ("svd", 0.6), ("lrs", 0.6),
                                         ("admm_lrs", 0.4)])
def test_method_reaches_flops_target_and_round_trips(name, target, tmp_path):
    original_flops = count_flops(tiny(), input_size=SIZE).flops
    model = tiny(torch.float32)
    if name in ("lrs", "admm_lrs"):   # frozen stages stay dense convs: ~1/3 of the sparse entries to rank
        model.layer4.requires_grad_(False)
    method, model, report = _compress(name, model, target, **FAST_ARGS.get(name, {}))
    assert method.pruned and method.prune_epoch is None
    recount = 1 - count_flops(model, input_size=SIZE).flops / original_flops
    assert target <= recount <= target + 0.01, recount
    assert report["achieved_r_flops"] == pytest.approx(recount, abs=1e-9)
    assert report["requested_r_flops"] == target and report["layers"]
    assert not any(isinstance(m, CompressedAwareConv2d) for m in model.modules())
    kinds = {type(m) for m in model.modules()}
    if name in ("lrs", "admm_lrs"):
        assert LowRankSparseConv2d in kinds
        assert report["r_flops_dense"] == pytest.approx(0.0)     # executed densely: the original conv cost
    if name == "svd":
        assert any(isinstance(m, LowRankConv2d) for m in model.modules())
    # the pruned model saves and reloads bit-exactly (spec types incl. lowrank_sparse / masked sparse conv)
    save_compressed(model, tmp_path / "m.pt")
    back = load_compressed(tmp_path / "m.pt")
    x = torch.randn(2, *SIZE)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    assert count_flops(back, input_size=SIZE).flops == count_flops(model, input_size=SIZE).flops


def _zero_channels(model, names, positive_shift: bool):
    """Zero the γ of every other channel of the norms after the given convs; shift > 0 (absorbed by the 1×1
    consumers) or < 0 (post-ReLU zero, exact for any consumer)."""
    graph = build_channel_graph(model)
    with torch.no_grad():
        for node in graph:
            if node.name in names:
                bn = model.get_submodule(node.norm)
                idx = torch.arange(1, bn.num_features, 2)
                bn.weight[idx] = 0
                bn.bias[idx] = bn.bias[idx].abs() + 0.1 if positive_shift else -bn.bias[idx].abs() - 0.1


@pytest.mark.parametrize("name", ["slimming", "l1_filter"])
def test_channel_methods_exact_on_dead_channels(name):
    """slimming: channels with γ = 0 removed → outputs unchanged; l1_filter: zero filters removed → unchanged.
    Consumers k×k get post-ReLU-zero channels; 1×1 consumers (stem → layer1.0.conv1/downsample, conv2 → conv3)
    get constant channels, which the surgery absorbs into their BatchNorm running mean."""
    model = tiny()
    convs_3x3_consumer = {n.name for n in build_channel_graph(model) if n.name.endswith(".conv1")}
    convs_1x1_consumer = {n.name for n in build_channel_graph(model) if n.prunable} - convs_3x3_consumer
    _zero_channels(model, convs_3x3_consumer, positive_shift=False)
    _zero_channels(model, convs_1x1_consumer, positive_shift=True)
    if name == "l1_filter":   # dead = zero filter (its BN then outputs a constant: shift − γ·mean/σ)
        graph = build_channel_graph(model)
        with torch.no_grad():
            for node in graph:
                if node.prunable:
                    bn = model.get_submodule(node.norm)
                    idx = torch.nonzero(bn.weight == 0).flatten()
                    model.get_submodule(node.name).weight[idx] = 0
                    bn.weight[idx] = torch.rand(len(idx), dtype=bn.weight.dtype) + 0.5
                    if node.name in convs_3x3_consumer:
                        bn.running_mean[idx] = 0.0   # BN(0) = shift < 0 → relu 0
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        y0 = model(x)
    _, model, report = _compress(name, model, target=0.1)
    assert report["achieved_r_flops"] >= 0.1
    with torch.no_grad():
        y1 = model(x)
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-10)


def test_slimming_prox_and_frozen_bn_detector():
    """FrozenBatchNorm2d after prunable convs becomes a trainable fixed-statistics BN (same function); the L1
    prox shrinks γ to exact zeros; pruning folds them back; the FLOPs target holds on the backbone body."""
    kw = dict(num_classes=3, depth=18, norm="frozen", min_size=64, max_size=64, rpn_pre_nms_top_n_test=50,
              rpn_post_nms_top_n_test=20)
    torch.manual_seed(0)
    det = build_model("fasterrcnn", **kw).eval()
    randomize_norms(det, 1)
    size = (3, 64, 64)
    body0 = count_flops(det, input_size=size).parts["backbone.body"]["flops"]
    x = torch.rand(3, 64, 64)
    with torch.no_grad():
        y0 = det.backbone.body(det.transform([x])[0].tensors)["0"]
    method = build_method("slimming", cfg(0.4, slimming_lambda=10.0), total_epochs=2)
    det = method.prepare(det)
    fixed = [m for m in det.modules() if isinstance(m, FixedStatBatchNorm2d)]
    assert len(fixed) == 8   # bn1 of the 8 BasicBlocks (the ResNet-18 stem is tied to layer1's residual)
    spec = architecture_spec(det)   # checkpoints taken while regularising resume with the same module types
    assert sum(v["type"] == "fixedstat_bn" for v in spec.values()) == 8
    fresh = apply_spec(build_model("fasterrcnn", **kw), spec)
    fresh.load_state_dict(det.state_dict())
    assert isinstance(fresh.backbone.body.layer3[1].bn1, FixedStatBatchNorm2d)
    det.train()
    with torch.no_grad():   # fixed statistics: same function in train mode
        torch.testing.assert_close(det.backbone.body(det.transform([x])[0].tensors)["0"], y0)
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    method.attach(det, opt)
    assert method.regularizing(0) and not method.regularizing(1)
    method.after_step(det, lr=0.01, epoch=0)   # threshold 0.1 on γ ∈ [0.4, 1.2) from randomize_norms
    method.after_step(det, lr=0.05, epoch=0)   # threshold 0.5: some γ reach exactly zero
    stats = method.epoch_stats(det, size)
    assert stats["zero_scale_channels"] > 0
    report = method.prune(det.eval(), size).report
    assert not any(isinstance(m, FixedStatBatchNorm2d) for m in det.modules())
    cut = 1 - count_flops(det, input_size=size).parts["backbone.body"]["flops"] / body0
    assert 0.4 <= cut <= 0.41 and report["achieved_r_flops"] == pytest.approx(cut)


def test_lrs_prox_then_masks_stay_applied_during_fine_tuning():
    torch.manual_seed(0)
    model = tiny(torch.float32)
    model.layer4.requires_grad_(False)   # frozen stages stay plain convs (and keep this test small)
    method = build_method("lrs", cfg(0.3, lrs_lambda=0.05), total_epochs=3)
    model = method.prepare(model)
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny(torch.float32)(x), rtol=1e-4, atol=1e-5)  # W = UV + S exactly
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseConv2d)]
    assert len(layers) == 13 and isinstance(model.layer4[0].conv2, nn.Conv2d)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-4)
    method.attach(model, opt)
    zeros0 = sum(int((m.sparse.weight == 0).sum()) for m in layers)
    method.after_step(model, lr=0.1, epoch=0)      # prox on S (λ·lr = 5e-3): exact zeros appear
    assert sum(int((m.sparse.weight == 0).sum()) for m in layers) > zeros0
    assert method.epoch_stats(model.eval(), SIZE)["sparse_S"] > 0
    method.prune(model, SIZE)
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseConv2d)]
    masks = [m.sparse.mask.clone() for m in layers]
    assert any(not bool(mk.all()) for mk in masks)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-4)
    method.attach(model, opt)
    for m in layers:   # stale velocity on masked entries: an optimizer step alone would revive them
        opt.state[m.sparse.weight]["momentum_buffer"] = torch.ones_like(m.sparse.weight)
    model.train()
    for step in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if step == 0:
            assert any(bool((m.sparse.weight[~m.sparse.mask] != 0).any()) for m in layers)
        method.after_step(model, lr=0.1, epoch=1)
        for m, mk in zip(layers, masks):
            assert torch.equal(m.sparse.mask, mk)
            assert not bool((m.sparse.weight[~mk] != 0).any())
    assert all(isinstance(m.sparse, MaskedConv2d) for m in layers)


@pytest.mark.parametrize("name", ["edp_rank", "edp_channel", "edp_separate"])
def test_edp_variants_through_the_interface(name):
    model = tiny(torch.float32)
    lambdas = {"edp_rank": {"lambda_rank": 0.5}, "edp_channel": {"lambda_channel": 0.5}}.get(
        name, {"lambda_rank": 0.5, "lambda_channel": 0.5})     # each variant declares only the λ it uses
    method = build_method(name, cfg(0.4, regularization="fixed") | lambdas, total_epochs=2)
    model = method.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    method.attach(model, opt)
    method.after_step(model, lr=0.01, epoch=0)
    entries = method.reg.entries
    if name == "edp_rank":
        assert all(e.lam_row == 0 for e in entries) and all(e.lam_col > 0 for e in entries)
    elif name == "edp_channel":
        assert all(e.lam_col == 0 for e in entries) and any(e.lam_row > 0 for e in entries)
    else:   # edp_separate: rank groups first (epoch 0 of epoch_es = 1 → half = 1)
        assert all(e.lam_row == 0 for e in entries) and all(e.lam_col > 0 for e in entries)
    report = method.prune(model, SIZE).report
    cut = 1 - count_flops(model, input_size=SIZE).flops / count_flops(tiny(), input_size=SIZE).flops
    assert 0.4 <= cut <= 0.41 and report["achieved_r_flops"] == pytest.approx(cut)


@pytest.mark.parametrize("stop", [True, False])
def test_edp_stops_regularising_once_zero_groups_reach_the_target(stop, caplog):
    """Proximal steps with a strong λ zero groups step by step; with stop_reg_at_target the prox stops at the first
    step whose zero groups alone remove the target (checked before the step, within the tolerance), and later
    steps leave β untouched; PM then cuts within the tolerance of the target."""
    model = tiny(torch.float32)
    target = 0.3
    method = build_method("edp", {"epoch_es": 1, "flops_target": target, "lambda_rank": 1.0, "lambda_channel": 1.0,
                                  "stop_reg_at_target": stop, "regularization": "fixed"}, total_epochs=2)
    model = method.prepare(model)
    method.input_size = SIZE
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for _ in range(600):
        method.after_step(model, lr=0.01, epoch=0)
        if method.reg_stopped_step is not None:
            break
    sparse = method.reg.sparsity(input_size=SIZE)["sparse_flops"]
    if not stop:
        assert method.reg_stopped_step is None and sparse > target
        return
    assert method.reg_stopped_step == method.steps
    betas = [e.block.beta_2d().clone() for e in method.reg.entries]
    for _ in range(10):
        method.after_step(model, lr=0.01, epoch=0)
    assert all(torch.equal(b, e.block.beta_2d()) for b, e in zip(betas, method.reg.entries))
    assert method.epoch_stats(model, SIZE)["reg_stopped_step"] == method.reg_stopped_step
    # resume keeps the decision
    again = build_method("edp", {"epoch_es": 1, "flops_target": target, "regularization": "fixed"}, total_epochs=2)
    again.load_state_dict(method.state_dict())
    assert again.reg_stopped_step == method.reg_stopped_step and again.steps == method.steps
    report = method.prune(model, SIZE).report
    assert target <= report["achieved_r_flops"] <= target + method.TARGET_TOLERANCE
    if "was not applied" not in caplog.text:   # the last step reached the target within the tolerance
        assert report["budget_removed_groups"] == 0
        assert report["r_flops_from_zero_groups"] == report["achieved_r_flops"]


@pytest.mark.parametrize("name", ["edp", "edp_separate"])
@pytest.mark.parametrize("stop", [True, False])
def test_extreme_lambda_respects_the_target(name, stop, caplog):
    """λ = 1e9: the first proximal step would zero every group. With stop_reg_at_target that step is not applied
    (β unchanged, a WARNING naming λ) and PM cuts the target within the tolerance; without it the step zeroes
    everything and PM warns that the cut exceeds the target."""
    model = tiny(torch.float32)
    target = 0.4
    method = build_method(name, {"epoch_es": 2, "flops_target": target, "lambda_rank": 1e9, "lambda_channel": 1e9,
                                 "stop_reg_at_target": stop, "regularization": "fixed"}, total_epochs=3)
    model = method.prepare(model)
    method.input_size = SIZE
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.01))
    betas = [e.block.beta_2d().clone() for e in method.reg.entries]
    with caplog.at_level("WARNING", logger="edp_det.methods.edp"):
        for epoch in (0, 1):
            method.after_step(model, lr=0.01, epoch=epoch)
        unchanged = all(torch.equal(b, e.block.beta_2d()) for b, e in zip(betas, method.reg.entries))
        report = method.prune(model, SIZE).report
    cut = 1 - count_flops(model, input_size=SIZE).flops / count_flops(tiny(), input_size=SIZE).flops
    assert report["achieved_r_flops"] == pytest.approx(cut, abs=1e-12)
    if stop:
        assert method.reg_stopped_step == 1 and unchanged
        assert target <= report["achieved_r_flops"] <= target + method.TARGET_TOLERANCE
        assert "was not applied" in caplog.text and "lambda_rank=1e+09" in caplog.text
    else:
        assert report["achieved_r_flops"] > target + method.TARGET_TOLERANCE
        assert "where 40.0 % was requested" in caplog.text


def test_edp_separate_switches_to_channels():
    model = tiny(torch.float32)
    method = build_method("edp_separate", {"epoch_es": 4, "flops_target": 0.4, "lambda_rank": 0.1,
                                           "lambda_channel": 0.2, "regularization": "fixed"}, total_epochs=6)
    model = method.prepare(model)
    method.attach(model, torch.optim.SGD(model.parameters(), lr=0.01))
    method.after_step(model, lr=0.0, epoch=3)
    prunable = [e for e in method.reg.entries if e.block.channel_prunable]
    assert all(e.lam_col == 0 for e in method.reg.entries) and all(e.lam_row == 0.2 for e in prunable)


def test_target_driven_edp_prunes_at_the_end_of_the_epoch_that_reached_the_target():
    """``prune_epoch``: Epoch_ES until the controller has reached the target, then the epoch that reached it (saved
    with the method state), never later than Epoch_ES; compaction stops before it; the fixed λ keeps Epoch_ES."""
    method = build_method("edp", {"epoch_es": 4, "flops_target": 0.4}, total_epochs=6)
    assert method.prune_epoch == 4
    for reached, epoch in ((1, 1), (3, 3), (6, 4)):
        method.load_state_dict({"target_epoch": reached})
        assert method.prune_epoch == epoch, reached
    method.load_state_dict({"target_epoch": 1})
    assert [method.compacts(e) for e in range(6)] == [False] * 6
    compacting = build_method("edp", {"epoch_es": 4, "flops_target": 0.4, "compact": True}, total_epochs=6)
    compacting.load_state_dict({"target_epoch": 3})
    assert compacting.prune_epoch == 3 and [compacting.compacts(e) for e in range(6)] == [True, True] + [False] * 4
    fixed = build_method("edp", {"epoch_es": 4, "flops_target": 0.4, "regularization": "fixed"}, total_epochs=6)
    fixed.load_state_dict({"target_epoch": 2})
    assert fixed.prune_epoch == 4
    method.load_state_dict({"pruned": True, "target_epoch": 1})
    assert method.prune_epoch is None


def test_registry_and_bad_input():
    for name in ("l1_filter", "slimming", "svd", "lrs", "admm_lrs", "edp_rank", "edp_channel", "edp_separate"):
        assert name in METHODS and METHODS[name].name == name
    with pytest.raises(ValueError, match="flops_target"):
        build_method("svd", {"epoch_es": 1, "flops_target": None}, 2)
    with pytest.raises(ValueError, match="epoch_es"):
        build_method("lrs", {"epoch_es": 5, "flops_target": 0.4}, 2)
    with pytest.raises(ValueError, match="'compress.rank_layers' = 'residual' is not one of: all, tied"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "rank_layers": "residual"}, 2)
    with pytest.raises(ValueError, match="'compress.compact' has value 'yes'"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "compact": "yes"}, 2)
    compacting = build_method("edp", {"epoch_es": 3, "flops_target": 0.4, "compact": True}, 4)
    assert [compacting.compacts(e) for e in range(4)] == [True, True, False, False]
    assert not any(build_method("edp", {"epoch_es": 3, "flops_target": 0.4}, 4).compacts(e) for e in range(4))
    with pytest.raises(ValueError, match="slimming_lambda"):
        build_method("slimming", cfg(0.4, slimming_lambda=-1.0), 2)
    with pytest.raises(ValueError, match="l1_normalize"):
        build_method("l1_filter", cfg(0.4, l1_normalize="max"), 2)
    method = build_method("admm_lrs", cfg(0.4), 2)
    assert method.calibration_batches == 2
    with pytest.raises(ValueError, match="calibrate"):
        method.prune(tiny(torch.float32), SIZE)
    layer = {"pos": 16, "ci": 8, "co": 8, "kk": 9, "r": 8, "s2": torch.linspace(8, 1, 8), "energy": 1.0,
             "entries": torch.rand(576), "nnz": 576}
    plans, cut = allocate_lowrank_sparse([layer], 0.5, orig_flops=2 * 16 * 576, other_flops=0)
    assert 0.5 <= cut <= 0.51 and not plans[0]["dense"] and len(plans[0]["cols"]) <= 7
    with pytest.raises(ValueError, match="cannot be reached"):
        allocate_lowrank_sparse([layer], 0.999, orig_flops=2 * 16 * 576, other_flops=0)
    state = build_method("svd", cfg(0.4), 2).state_dict()
    resumed = build_method("svd", cfg(0.4), 2)
    resumed.load_state_dict({"pruned": True})
    assert state == {"pruned": False} and resumed.prune_epoch is None
