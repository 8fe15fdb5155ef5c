"""prune_and_merge (PM, §III-C): exactness on models whose removed groups are exactly zero, the resulting
structure (channel counts, merge decisions of eq. 14, stem consumers), extremes, training after PM, the FLOPs-target
budget (with rounding) and bad input."""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn

import edp_det
from edp_det import CompressedAwareConv2d, count_flops, iter_blocks, prune_and_merge
from edp_det.ops.surgery import LowRankConv2d

from _core_helpers import (DET_KW, assert_det_close, build, cached, det_image, one_thread, rel_err,  # noqa: F401
                           sparsify, zero_row)

pytestmark = pytest.mark.usefixtures("one_thread")

HW = (37, 45)   # odd sizes: padding borders and stride-2 rounding are exercised


def _producer(name: str, prunable: set) -> str | None:
    """Independent re-statement of the ResNet channel graph: whose pruned output channels feed ``name``."""
    m = re.fullmatch(r"(.*)layer(\d)\.(\d+)\.(conv\d|downsample\.0)", name)
    if m is None:
        return None
    stem, li, bi, conv = m[1] + "conv1", int(m[2]), int(m[3]), m[4]
    if conv in ("conv1", "downsample.0"):
        return stem if (li, bi) == (1, 0) and stem in prunable else None
    prev = {"conv2": "conv1", "conv3": "conv2"}[conv]
    return name[: -len(conv)] + prev


def _expected(model, left: dict) -> dict:
    """name -> (c_in, r, c_out, k·k) expected after PM, from the groups the test left non-zero."""
    blocks = dict(iter_blocks(model))
    prunable = {n for n, b in blocks.items() if b.channel_prunable}
    out = {}
    for n, b in blocks.items():
        r, co = left[n]
        co = co if b.channel_prunable else b.out_channels
        out[n] = [b.in_channels, r, co, b.kernel_size[0] * b.kernel_size[1]]
    for n in blocks:
        p = _producer(n, prunable)
        if p is not None:
            out[n][0] = out[p][2]
    return {n: tuple(v) for n, v in out.items()}


def _eq14(ci, r, co, kk) -> bool:
    return ci * co * kk <= r * (ci * kk + co)


def _check_structure(model, report, expected: dict, norms_after: dict) -> None:
    assert not any(isinstance(m, CompressedAwareConv2d) for m in model.modules())
    assert [l.name for l in report.layers] == list(expected)
    n_merged = 0
    for l in report.layers:
        ci, r, co, kk = expected[l.name]
        assert l.after == (ci, r, co), l.name
        assert l.merged == _eq14(ci, r, co, kk), l.name
        n_merged += l.merged
        mod = model.get_submodule(l.name)
        k = l.kernel
        if l.merged:
            assert type(mod) is nn.Conv2d and tuple(mod.weight.shape) == (co, ci, *k), l.name
        else:
            assert isinstance(mod, LowRankConv2d) and list(mod._modules) == ["basis", "coeff"], l.name
            assert tuple(mod.basis.weight.shape) == (r, ci, *k), l.name
            assert tuple(mod.coeff.weight.shape) == (co, r, 1, 1), l.name
        norm = norms_after.get(l.name)
        if isinstance(norm, nn.BatchNorm2d):
            assert norm.num_features == co and norm.weight.shape == (co,) and norm.running_mean.shape == (co,)
    # both kinds of decision occur, so eq. (14) is really exercised
    assert 0 < n_merged < len(report.layers)


def _norms_after(model, names_to_norm: dict) -> dict:
    return {n: model.get_submodule(nn_) for n, nn_ in names_to_norm.items()}


def _train_step_changes_weights(model, x):
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(x)
    loss = out.pow(2).mean() if isinstance(out, torch.Tensor) else sum(v.pow(2).mean() for v in out.values())
    opt.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, params[n])]
    return changed


EXTREME = ("conv1", "layer2.1.conv3", "layer1.2.conv2", "layer3.0.conv1")


@torch.no_grad()
def _make_extremes(model) -> list[int]:
    """Stem channels pruned (so both layer1.0.conv1 and layer1.0.downsample.0 must lose inputs), a bottleneck whose
    conv3 rank reaches 0 (dead residual branch), an ordinary low-rank layer, and a prunable layer whose channels
    all die. Returns the dead stem channels."""
    stem_dead = list(range(0, 64, 3))           # 22 channels
    for i in stem_dead:
        zero_row(model, model.conv1, i)
    model.layer2[1].conv3.beta_2d().zero_()
    model.layer1[2].conv2.beta_2d()[:, 5:] = 0
    for i in range(model.layer3[0].conv1.out_channels):
        zero_row(model, model.layer3[0].conv1, i)
    return stem_dead


def _check_extremes(model, report, stem_dead, norm) -> None:
    layers = {l.name: l for l in report.layers}
    live = 64 - len(stem_dead)
    assert layers["conv1"].after == (3, 64, live)
    for consumer in ("layer1.0.conv1", "layer1.0.downsample.0"):
        assert layers[consumer].after[0] == live
        mod = model.get_submodule(consumer)
        conv = mod if isinstance(mod, nn.Conv2d) else mod.basis
        assert conv.in_channels == live, consumer
    if norm == "bn":
        assert model.bn1.num_features == live and bool((model.bn1.weight != 0).all())
    # dead residual branch: conv3 keeps one all-zero column, its producers collapse to one channel each
    assert layers["layer2.1.conv3"].after == (1, 1, 512)
    assert layers["layer2.1.conv2"].after[2] == 1 and layers["layer2.1.conv1"].after[2] == 1
    conv3 = model.layer2[1].conv3
    w = conv3.weight if layers["layer2.1.conv3"].merged else conv3.coeff.weight
    assert w.abs().max() == 0
    assert layers["layer1.2.conv2"].after[1] == 5
    # all channels dead: one all-zero channel is kept (convs cannot be empty)
    assert layers["layer3.0.conv1"].after[2] == 1 and layers["layer3.0.conv2"].after[0] == 1


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("resnet50", {}), ("resnet50", {"norm": "frozen"})],
                         ids=["resnet18-bn", "resnet50-bn", "resnet50-frozen"])
def test_pm_exact_on_exactly_zero_groups(name, kw):
    """Random zero columns/row groups everywhere (+ the extremes on ResNet-50): PM is exact, the structure is the
    expected one, merges follow eq. (14), and the result trains."""
    _, model = cached(name, num_classes=10, **kw)
    norm = kw.get("norm", "bn")
    extremes = name == "resnet50"
    left = sparsify(model, seed=1, skip=EXTREME if extremes else ())
    stem_dead = _make_extremes(model) if extremes else []
    if extremes:
        left.update({"conv1": (64, 64 - len(stem_dead)), "layer1.2.conv2": (5, 64)})
    expected = _expected(model, left)
    if extremes:   # what the dead channels collapse to (one all-zero channel/column kept where all die)
        expected.update({"layer2.1.conv1": (512, 1, 1, 1), "layer2.1.conv2": (1, 1, 1, 9),
                         "layer2.1.conv3": (1, 1, 512, 1), "layer3.0.conv1": (512, 1, 1, 1),
                         "layer3.0.conv2": (1, 1, left["layer3.0.conv2"][1], 9)})
    names_to_norm = {n: b.norm_name for n, b in iter_blocks(model) if b.norm_name}
    assert bool(names_to_norm) == (norm == "bn")     # BN nets: row groups own the BN affine params
    model.eval()
    x = torch.randn(2, 3, *HW, dtype=torch.float64)
    ref = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    report = prune_and_merge(model, input_size=(3, *HW))
    model.eval()
    out = model(x)
    assert rel_err(ref, out) <= 1e-10
    _check_structure(model, report, expected, _norms_after(model, names_to_norm))
    if extremes:
        _check_extremes(model, report, stem_dead, norm)
    assert report.budget_removed_groups == 0 and report.requested_r_flops is None
    assert report.params_after == sum(p.numel() for p in model.parameters()) < params_before == report.params_before
    # the surviving BN channels are exactly the live ones (dead ones had γ = b = 0)
    for n, nn_ in names_to_norm.items():
        if n not in ("layer3.0.conv1", "layer2.1.conv1", "layer2.1.conv2"):   # all-dead: one zero channel kept
            assert bool((model.get_submodule(nn_).weight != 0).all()), nn_
    # the pruned model keeps training: backward + SGD step changes (nearly) every parameter
    changed = _train_step_changes_weights(model, x)
    assert "fc.weight" in changed
    assert len(changed) > 0.9 * len(list(model.parameters()))


def test_pm_faster_rcnn_exact():
    """R50-FPN with scope="detector" (body + FPN + RPN head conv), FrozenBN folded: body features, FPN features and
    the full detector outputs are unchanged by PM."""
    original, model = cached("fasterrcnn", decompose_kw={"scope": "detector"}, **DET_KW)
    left = sparsify(model, seed=2)
    expected = _expected(model, left)
    assert any(n.startswith("backbone.fpn.") and left[n][0] < model.get_submodule(n).rank for n in left)
    model.eval()
    x = torch.randn(1, 3, *HW, dtype=torch.float64)
    img = det_image(3)
    body_ref, feats_ref, det_ref = model.backbone.body(x), model.backbone(x), model([img])
    report = prune_and_merge(model, input_size=(3, 64, 64))
    model.eval()
    body, feats = model.backbone.body(x), model.backbone(x)
    for k in body_ref:
        assert body[k].shape == body_ref[k].shape and rel_err(body_ref[k], body[k]) <= 1e-10
    for k in feats_ref:
        assert rel_err(feats_ref[k], feats[k]) <= 1e-10
    assert_det_close(det_ref, model([img]), 1e-9)
    _check_structure(model, report, expected, {})
    assert isinstance(model.backbone.body.bn1, nn.Identity)        # FrozenBN folded
    # the FLOPs scope is body + FPN + RPN head, relative to the undecomposed detector
    ref = count_flops(original, input_size=(3, 64, 64))
    assert report.flops_original == sum(ref.parts[p]["flops"] for p in ("backbone.body", "backbone.fpn", "rpn"))
    now = count_flops(model, input_size=(3, 64, 64))
    assert report.flops_after == sum(now.parts[p]["flops"] for p in ("backbone.body", "backbone.fpn", "rpn"))
    assert now.parts["roi_heads"]["flops"] == ref.parts["roi_heads"]["flops"]
    changed = _train_step_changes_weights(model.backbone, x)
    assert any(c.startswith("body.layer4") for c in changed) and any(c.startswith("fpn.") for c in changed)


@functools.lru_cache(maxsize=None)
def _original_flops_r50_64() -> int:
    original, _ = cached("resnet50", dtype=torch.float32, num_classes=10)
    return count_flops(original, input_size=(3, 64, 64)).flops


@pytest.mark.parametrize("target,round_to", [(0.3, None), (0.5, None), (0.5, 8)])
def test_flops_target_reached_within_one_point(target, round_to):
    _, model = cached("resnet50", dtype=torch.float32, num_classes=10)
    prunable = {n for n, b in iter_blocks(model) if b.channel_prunable}
    report = prune_and_merge(model, flops_target=target, input_size=(3, 64, 64), round_to=round_to)
    orig = _original_flops_r50_64()
    after = count_flops(model, input_size=(3, 64, 64)).flops
    cut = 1 - after / orig
    assert target <= cut <= target + 0.01, cut
    assert report.flops_original == orig and report.flops_after == after
    assert report.achieved_r_flops == pytest.approx(cut, abs=1e-12)
    assert report.requested_r_flops == target and report.budget_removed_groups > 0
    assert report.r_flops_from_zero_groups == pytest.approx(0.0, abs=1e-12)   # nothing zero: all would merge back
    assert not any(isinstance(m, CompressedAwareConv2d) for m in model.modules())
    for l in report.layers:
        ci, r, co = l.after
        assert r >= 1 and co >= 1 and l.merged == _eq14(ci, r, co, l.kernel[0] * l.kernel[1]), l.name
        mod = model.get_submodule(l.name)
        real = (mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else \
            (mod.basis.in_channels, mod.coeff.out_channels)
        assert real == (ci, co), l.name
        if l.name not in prunable:
            assert co == l.before[2], l.name
        if round_to:
            if not l.merged:
                assert r % round_to == 0 or r == l.before[1], (l.name, l.before, l.after)
            assert co % round_to == 0 or co == l.before[2], (l.name, l.before, l.after)
    assert any(l.after[2] < l.before[2] for l in report.layers), "the budget removed no channel at all"
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_zero_groups_exceeding_target_remove_nothing_more():
    _, model = cached("resnet18", num_classes=10)
    left = sparsify(model, seed=4, col_fracs=(0.85,), row_fracs=(0.75,))
    expected = _expected(model, left)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    report = prune_and_merge(model, flops_target=0.3, input_size=(3, 32, 32))
    assert report.r_flops_from_zero_groups >= 0.3
    assert report.budget_removed_groups == 0
    assert [l.after for l in report.layers] == [expected[l.name][:3] for l in report.layers]
    assert report.achieved_r_flops == pytest.approx(report.r_flops_from_zero_groups, abs=1e-12)
    assert rel_err(ref, model(x)) <= 1e-10


def test_target_with_every_group_zero():
    """A regulariser that zeroed everything (too strong a λ): the zero groups alone exceed any target, PM must
    still run (removing nothing more) and stay exact; with no group left to remove an unreachable target raises."""
    _, model = cached("resnet18", num_classes=10)
    with torch.no_grad():
        for _, b in iter_blocks(model):
            b.beta_2d().zero_()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    model.eval()
    ref = model(x)
    report = prune_and_merge(model, flops_target=0.4, input_size=(3, 32, 32))
    assert report.budget_removed_groups == 0 and report.achieved_r_flops > 0.9
    assert rel_err(ref, model(x)) <= 1e-10
    _, fresh = cached("resnet18", num_classes=10)
    with torch.no_grad():          # every layer down to one live group, nothing zero: a 0.999 cut is impossible
        for _, b in iter_blocks(fresh):
            b.beta_2d()[:, 1:] = 0
    with pytest.raises(ValueError, match="cannot be reached"):
        prune_and_merge(fresh, flops_target=0.999, input_size=(3, 32, 32), rank_layers="tied")


def test_merge_never_keeps_two_convs():
    _, model = cached("resnet18", num_classes=10)
    left = sparsify(model, seed=5)
    expected = _expected(model, left)
    x = torch.randn(1, 3, *HW, dtype=torch.float64)
    ref = model(x)
    report = prune_and_merge(model, input_size=(3, *HW), merge="never")
    assert not any(l.merged for l in report.layers)
    for l in report.layers:
        assert l.after == expected[l.name][:3]
        assert isinstance(model.get_submodule(l.name), LowRankConv2d)
    assert rel_err(ref, model(x)) <= 1e-10


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "0.4", True, float("nan")])
def test_bad_flops_target_raises(bad):
    _, model = cached("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="flops_target"):
        prune_and_merge(model, flops_target=bad, input_size=(3, 32, 32))
    assert all(isinstance(b, CompressedAwareConv2d) for _, b in iter_blocks(model)) and edp_det.is_decomposed(model)


@pytest.mark.parametrize("kw", [{"round_to": 0}, {"round_to": 8.0}, {"round_to": True}, {"merge": "sometimes"}])
def test_bad_options_raise(kw):
    _, model = cached("resnet18", num_classes=10)
    with pytest.raises(ValueError):
        prune_and_merge(model, input_size=(3, 32, 32), **kw)
    assert edp_det.is_decomposed(model)


def test_unreachable_target_raises():
    _, model = cached("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="cannot be reached"):
        prune_and_merge(model, flops_target=0.999, input_size=(3, 32, 32))


def test_never_decomposed_model_raises():
    model = build("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="decompose"):
        prune_and_merge(model, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match="decompose"):
        prune_and_merge(model, flops_target=0.5, input_size=(3, 32, 32))


def _dead_layer_model(compact: bool):
    """ResNet-18 (float64) with random zero groups and one whole dead layer (every output channel of
    ``layer4.1.conv1`` zero, so ``layer4.1.conv2`` reads nothing): PM keeps one all-zero entry in each dead
    dimension, which the FLOPs budget must count. Optionally compacted first, as during training."""
    from edp_det.edp.compaction import compact_zero_groups

    _, model = cached("resnet18", num_classes=10)
    sparsify(model, seed=7, col_fracs=(0.1, 0.3), row_fracs=(0.0, 0.2))
    for i in range(model.layer4[1].conv1.out_channels):
        zero_row(model, model.layer4[1].conv1, i)
    if compact:
        assert compact_zero_groups(model).changed
    return model


@pytest.mark.parametrize("compact", [False, True], ids=["plain", "compacted"])
def test_budget_cost_equals_the_built_model_with_a_dead_layer(compact):
    """The analytic cost the FLOPs selection bisects on is the count of the model PM builds, so the cut the
    selection promises is the cut the pruned model has; with a target equal to the zero groups' own cut
    (nothing more to remove) and with targets the budget must reach, achieved >= requested exactly."""
    from edp_det.edp.budget import SPREAD, structure_from_model

    size = (3, 32, 32)
    model = _dead_layer_model(compact)
    predicted = structure_from_model(copy.deepcopy(model), input_size=size).flops_after()
    plain = copy.deepcopy(model)
    report = prune_and_merge(plain, input_size=size)
    assert report.flops_after == count_flops(plain, input_size=size).flops == predicted
    assert report.r_flops_from_zero_groups == report.achieved_r_flops
    zero_cut = report.achieved_r_flops
    for target in (zero_cut, 0.35, 0.4, 0.55):
        struct = structure_from_model(copy.deepcopy(model), input_size=size)
        removals, promised = struct.select_for_target(target, layer_weights=struct.estimated_time_per_flop(),
                                                      spread=SPREAD)
        struct.zero_groups(removals)
        struct.refresh()
        pruned = copy.deepcopy(model)
        rep = prune_and_merge(pruned, flops_target=target, input_size=size)
        after = count_flops(pruned, input_size=size).flops
        assert rep.flops_after == after == struct.flops_after(), target
        assert (rep.flops_original - after) / rep.flops_original == rep.achieved_r_flops == promised
        assert rep.achieved_r_flops >= target and (rep.flops_original - after) >= target * rep.flops_original


def test_missed_target_after_pm_raises(monkeypatch):
    """If the built model ever cut less than the budget promised, PM fails naming both numbers instead of
    returning a model below the target (simulated by a budget that under-counts every structure)."""
    from edp_det.edp import budget

    real = budget.Structure.flops_after
    monkeypatch.setattr(budget.Structure, "flops_after", lambda self, counts=None: real(self, counts) - 10 ** 6)
    _, model = cached("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"missed flops_target=0\.4: the pruned model cuts 0\.3"):
        prune_and_merge(model, flops_target=0.4, input_size=(3, 32, 32))
