"""Latency-aware budget: measured time per FLOP (edp_det.deploy.latency) and its use by prune_and_merge / the EDP method.

No timing is asserted (timings are noisy): the tests pin what the measurement must satisfy by construction (every
layer timed at the input it really sees, the dense variant is the original network, FLOPs-weighted mean exactly 1)
and what the budget must do with given weights (cut heavily weighted layers first, still meet the FLOPs target)."""
import copy
import json

import pytest
import torch

import edp_det
from _core_helpers import DET_KW, cached, one_thread  # noqa: F401
from edp_det.deploy.latency import MIN_WEIGHT, _surgery_variant, measure_time_per_flop
from edp_det.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _orig_block_flops(model, input_size):
    rep = edp_det.count_flops(model, input_size=input_size)
    return {m.name: m.orig_flops for m in rep.modules if m.kind == "edp_block"}


def test_average_weights_cover_every_layer_and_average_to_one():
    _, m = cached("resnet18", num_classes=10)
    w = measure_time_per_flop(m, input_size=(3, 64, 64), mode="average", rounds=1, iters=1)
    flops = _orig_block_flops(m, (3, 64, 64))
    assert set(w) == set(flops) == {n for n, _ in edp_det.iter_blocks(m)}
    assert all(v > 0 for v in w.values())
    # weights are relative to the FLOPs-weighted mean time per FLOP: sum(w * F) / sum(F) == 1, which only holds if
    # every layer's FLOPs were counted at the spatial size it really sees (stride 2 stages included)
    assert sum(w[n] * flops[n] for n in w) / sum(flops.values()) == pytest.approx(1.0, rel=1e-9)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    w2 = measure_time_per_flop(m, x, mode="average", rounds=1, iters=1)   # explicit example input, batch 2
    assert set(w2) == set(w)


def test_marginal_weights_per_residual_block():
    original, m = cached("resnet18", num_classes=10)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    prof = measure_time_per_flop(m, x, rounds=1, iters=1, return_profile=True)
    blocks = {n for n, _ in edp_det.iter_blocks(m)}
    assert prof.mode == "marginal" and set(prof.weights) == blocks
    # units: the stem conv alone, every BasicBlock with all its layers (downsample included)
    assert prof.unit_of["conv1"] == "conv1"
    assert prof.unit_of["layer2.0.conv2"] == prof.unit_of["layer2.0.downsample.0"] == "layer2.0"
    assert len(set(prof.units)) == 1 + 8
    # the dense variant is the original network: its units' FLOPs add up to the original's conv FLOPs at this
    # batch (fc is outside every unit); every thin unit has fewer FLOPs
    ref = edp_det.count_flops(original, example_inputs=x)
    conv_flops = sum(r.flops for r in ref.modules if r.kind == "conv")
    assert sum(fd for _, _, fd, _ in prof.units.values()) == conv_flops
    assert all(0 < ft < fd for _, _, fd, ft in prof.units.values())
    # weight = unit slope / FLOPs-weighted mean slope (floored at MIN_WEIGHT), the same for all layers of a unit
    mean = (sum(td - tt for td, tt, _, _ in prof.units.values())
            / sum(fd - ft for _, _, fd, ft in prof.units.values()))
    for n, u in prof.unit_of.items():
        td, tt, fd, ft = prof.units[u]
        assert prof.weights[n] == pytest.approx(max(MIN_WEIGHT, (td - tt) / (fd - ft) / mean), rel=1e-12)


def test_surgery_variants_dense_is_exact_and_thin_keeps_the_fraction():
    _, m = cached("resnet50", num_classes=10)
    m.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    dense = _surgery_variant(m, None)
    assert not list(edp_det.iter_blocks(dense))                   # every layer is one plain conv again
    assert torch.allclose(dense(x), m(x), rtol=1e-9, atol=1e-12)   # all groups kept: the same function
    thin = _surgery_variant(m, 0.25)
    # channel-prunable layers keep ceil(0.25 * c_out) channels, consumers follow; residual widths are untouched
    c1 = thin.get_submodule("layer1.0.conv1")
    c2 = thin.get_submodule("layer1.0.conv2")
    c3 = thin.get_submodule("layer1.0.conv3")
    assert c1.out_channels == 16 and c2.in_channels == 16 and c2.out_channels == 16
    assert thin.get_submodule("conv1").out_channels == 16
    assert thin(x).shape == (2, 10)
    # conv3 (tied to the residual add) keeps its 256 outputs, at rank ceil(0.25 * 64) = 16 -> merged by eq. (14)
    # since its input is only 16 channels wide
    assert c3.out_channels == 256 and c3.in_channels == 16


def test_detector_measures_the_backbone_body():
    _, det = cached("fasterrcnn", decompose_kw={"scope": "detector"}, **DET_KW)
    w = measure_time_per_flop(det, input_size=(3, 64, 64), rounds=1, iters=1)
    body = {n for n, _ in edp_det.iter_blocks(det) if n.startswith("backbone.body.")}
    assert set(w) == body and len(body) < len(list(edp_det.iter_blocks(det)))   # FPN/RPN blocks: no entry


def test_bad_inputs():
    original, m = cached("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="never decomposed"):
        measure_time_per_flop(original)
    with pytest.raises(ValueError, match="latency mode"):
        measure_time_per_flop(m, mode="fast")
    for bad in (0, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="thin"):
            measure_time_per_flop(m, thin=bad)
    with pytest.raises(ValueError, match="batch_size"):
        measure_time_per_flop(m, batch_size=0)
    with pytest.raises(ValueError, match="example_input"):
        measure_time_per_flop(m, torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="not decomposed blocks"):
        edp_det.prune_and_merge(m, flops_target=0.4, input_size=(3, 64, 64), layer_weights={"fc": 2.0})
    with pytest.raises(ValueError, match="positive finite"):
        edp_det.prune_and_merge(m, flops_target=0.4, input_size=(3, 64, 64), layer_weights={"conv1": -1.0})
    with pytest.raises(TypeError, match="dict"):
        edp_det.prune_and_merge(m, flops_target=0.4, input_size=(3, 64, 64), layer_weights=[1.0])


def _kept_fraction(rep, prefix):
    before = sum(l.flops_before for l in rep.layers if l.name.startswith(prefix))
    after = sum(l.flops_after for l in rep.layers if l.name.startswith(prefix))
    return after / before


def test_weights_steer_the_budget():
    _, m = cached("resnet18", dtype=torch.float64, num_classes=10)
    size = (3, 64, 64)
    plain = copy.deepcopy(m)
    rep_plain = edp_det.prune_and_merge(plain, flops_target=0.4, input_size=size, layer_weights=None)
    weighted = copy.deepcopy(m)
    weights = {n: (4.0 if n.startswith("layer4.") else 1.0) for n, _ in edp_det.iter_blocks(m)}
    rep = edp_det.prune_and_merge(weighted, flops_target=0.4, input_size=size, layer_weights=weights)
    assert rep.budget == "norm/measured time" and rep_plain.budget == "norm"
    assert 0.40 <= rep.achieved_r_flops <= 0.41
    # layer4, weighted as 4x slower per FLOP, is cut harder; the rest keeps more than without weights
    assert _kept_fraction(rep, "layer4.") < _kept_fraction(rep_plain, "layer4.") - 0.1
    assert _kept_fraction(rep, "layer1.") > _kept_fraction(rep_plain, "layer1.")
    assert edp_det.count_flops(weighted, input_size=size).flops == rep.flops_after


def test_edp_method_latency_aware_and_config_errors(tmp_path):
    _, m = cached("resnet18", num_classes=10)
    fresh = copy.deepcopy(m)
    method = build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency": {"aware": True, "batch": 2},
                                  "rank_layers": "tied", "regularization": "fixed"}, 2)
    model = method.prepare(m)
    out = method.prune(model, (3, 64, 64)).report
    assert out["budget"] == "norm/measured time" and 0.40 <= out["achieved_r_flops"] <= 0.41
    assert set(out["layer_weights"]) == {n for n, _ in edp_det.iter_blocks(fresh)}
    # the measured weights, saved in pm_report.json, reproduce the same structure without measuring again
    report_file = tmp_path / "pm_report.json"
    report_file.write_text(json.dumps(out))
    again = build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency": {"weights": str(report_file)},
                                 "rank_layers": "tied", "regularization": "fixed"}, 2)
    out2 = again.prune(again.prepare(fresh), (3, 64, 64)).report
    assert out2["budget"] == "norm/measured time" and out2["layers"] == out["layers"]
    plain = tmp_path / "w.json"
    plain.write_text(json.dumps(out["layer_weights"]))
    reused = build_method("edp", {"epoch_es": 1, "latency": {"weights": str(plain)}, "regularization": "fixed"}, 2)
    assert reused.latency_weights == out["layer_weights"]
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "neg.json").write_text(json.dumps({"conv1": -1}))
    (tmp_path / "list.json").write_text("[1, 2]")
    for bad, msg in ((tmp_path / "missing.json", "not a file"), (tmp_path / "bad.json", "not valid JSON"),
                     (tmp_path / "neg.json", "positive finite"), (tmp_path / "list.json", "expected an object")):
        with pytest.raises(ValueError, match="compress.latency.weights") as e:
            build_method("edp", {"epoch_es": 1, "latency": {"weights": str(bad)}}, 2)
        assert msg in str(e.value)
    with pytest.raises(ValueError, match="'compress.latency.aware' has value 'yes'"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency": {"aware": "yes"}}, 2)
    with pytest.raises(ValueError, match="'compress.latency.batch' = 0 is out of range"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency": {"batch": 0}}, 2)
    with pytest.raises(ValueError, match="'compress.latency.mode' = 'fastest' is not one of"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency": {"mode": "fastest"}}, 2)
    with pytest.raises(ValueError, match="'compress.latency_aware'.*did you mean 'compress.latency.aware'"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency_aware": True}, 2)
    with pytest.raises(ValueError, match="compress.latency.estimate=false has no effect with measured"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "regularization": "fixed",
                             "latency": {"aware": True, "estimate": False}}, 2)
    with pytest.raises(ValueError, match="compress.latency.estimate=False is an option of the PM budget"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "latency": {"estimate": False}}, 2)


def test_edp_method_budget_weights_default_to_the_estimate():
    """The EDP method's PM budget (fixed λ) weighs layers by their estimated time per FLOP unless
    ``compress.latency.estimate: false`` asks for the paper's per-layer ratio; the structures are those of the
    library call with the same weights."""
    _, m = cached("resnet18", num_classes=10)
    size = (3, 64, 64)
    reports = {}
    for estimate in (True, False):
        method = build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "regularization": "fixed",
                                      "latency": {"estimate": estimate}}, 2)
        reports[estimate] = method.prune(method.prepare(copy.deepcopy(m)), size).report
    assert reports[True]["budget"] == "norm/estimated time" and reports[False]["budget"] == "norm"
    assert "layer_weights" not in reports[True]            # only measured weights are saved for reuse
    for estimate, weights in ((True, "estimate"), (False, None)):
        lib = build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "regularization": "fixed"}, 2).prepare(
            copy.deepcopy(m))
        rep = edp_det.prune_and_merge(lib, flops_target=0.4, input_size=size, layer_weights=weights)
        assert [l["after"] for l in reports[estimate]["layers"]] == [list(l.after) for l in rep.layers]
    assert reports[True]["layers"] != reports[False]["layers"]


def test_max_layer_cut_caps_every_layer():
    _, m = cached("resnet18", dtype=torch.float64, num_classes=10)
    size = (3, 64, 64)
    weights = {n: (4.0 if n.startswith("layer4.") else 1.0) for n, _ in edp_det.iter_blocks(m)}
    uncapped = edp_det.prune_and_merge(copy.deepcopy(m), flops_target=0.4, input_size=size, layer_weights=weights)
    capped_model = copy.deepcopy(m)
    capped = edp_det.prune_and_merge(capped_model, flops_target=0.4, input_size=size, layer_weights=weights,
                                     max_layer_cut=0.5)
    assert 0.40 <= capped.achieved_r_flops <= 0.41
    assert edp_det.count_flops(capped_model, input_size=size).flops == capped.flops_after

    def worst_kept(rep):
        fracs = []
        for l in rep.layers:
            fracs.append(l.after[2] / l.before[2])
            if not l.merged:
                fracs.append(l.after[1] / l.before[1])
        return min(fracs)
    assert worst_kept(uncapped) < 0.5        # without the cap layer4 is cut below half
    assert worst_kept(capped) >= 0.5         # with it no layer loses more than half of its ranks or channels
    with pytest.raises(ValueError, match="cannot be reached"):
        edp_det.prune_and_merge(copy.deepcopy(m), flops_target=0.8, input_size=size, max_layer_cut=0.05)
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="max_layer_cut"):
            edp_det.prune_and_merge(copy.deepcopy(m), flops_target=0.4, input_size=size, max_layer_cut=bad)
    with pytest.raises(ValueError, match="compress.max_layer_cut"):
        build_method("edp", {"epoch_es": 1, "flops_target": 0.4, "max_layer_cut": 2}, 2)
