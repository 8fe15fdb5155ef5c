"""Target-driven regularisation (edp_det.edp.controller): the groups trained to exactly zero reach the FLOPs target
within tolerance under SGD and AdamW, at different learning rates and from a trained start; they stay zero
(weights and optimizer state) afterwards; PM after it removes only zeros (float64-exact); cost weights decide
which groups go first; bad values fail clearly."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from edp_det import count_flops
from edp_det.edp.budget import BudgetError, structure_from_model
from edp_det.edp.controller import TargetController, group_weights
from edp_det.edp.regularizer import OPTIMIZER_STATE_KEYS, EDPRegularizer
from edp_det.methods import build_method
from edp_det.ops.flops import flops_cut

from test_methods import SIZE, tiny

from _core_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 30
TARGET = 0.4
TOL = 0.02
#: the controlled mode (the default) with FLOPs weights (the default weight is uniform)
TARGET_MODE = {"regularization": "target", "group_weight": "flops"}


def _batch(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, *SIZE, generator=g, dtype=dtype), torch.randint(0, 10, (8,), generator=g)


def _optimizer(model, kind, lr):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)


def _train_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _controlled(kind="adamw", lr=1e-3, pre_steps=0, dtype=torch.float32, steps=STEPS, extra=None, total=None):
    """A tiny Bottleneck ResNet trained ``steps`` steps under the controller (``pre_steps`` plain steps first)."""
    model = tiny(dtype).train()
    x, y = _batch(dtype)
    method = build_method("edp", {"epoch_es": 1, "flops_target": TARGET, **TARGET_MODE, **(extra or {})},
                          total_epochs=2)
    model = method.prepare(model)
    method.input_size = SIZE
    method.iters_per_epoch = total or steps
    opt = _optimizer(model, kind, lr)
    for _ in range(pre_steps):
        _train_step(model, opt, x, y)
    method.attach(model, opt)
    records = []
    for _ in range(steps):
        _train_step(model, opt, x, y)
        method.after_step(model, lr, epoch=0)
        records.append(method.step_stats())
    return method, model, opt, records, (x, y)


def _zero_cut(method):
    """FLOPs cut of the scope (vs the original network) that the exactly-zero groups give."""
    struct = structure_from_model(method.reg.model, input_size=SIZE)
    return flops_cut(struct.original_flops, struct.flops_after())


@pytest.mark.parametrize("kind,lr,pre", [("sgd", 0.05, 0), ("sgd", 0.005, 0), ("adamw", 1e-3, 0),
                                         ("adamw", 1e-4, 0), ("adamw", 1e-4, 20)],
                         ids=["sgd-0.05", "sgd-0.005", "adamw-1e-3", "adamw-1e-4", "adamw-trained-start"])
def test_controller_reaches_the_target_within_tolerance(kind, lr, pre):
    method, model, opt, records, _ = _controlled(kind, lr, pre)
    ctrl = method.controller
    assert ctrl.frozen_step is not None and ctrl.frozen_step <= STEPS
    cut = _zero_cut(method)
    assert TARGET <= cut <= TARGET + TOL, cut
    # the trajectory: λ per kind, zero-group cut and its reference, live counts
    updates = [r for r in records if "reg_lambda_rank" in r]
    assert updates and all(r["reg_lambda_rank"] >= 0 and r["reg_lambda_channel"] >= 0 for r in updates)
    assert any(r["reg_lambda_rank"] > 0 and r["reg_lambda_channel"] > 0 for r in updates)
    # smooth approach: in the first half of the ramp the cut stays near the reference H steps ahead (no burst
    # to the target; the tolerance is one layer's worth of groups of this tiny network)
    deadline, horizon = ctrl.deadline, ctrl.HORIZON * ctrl.deadline
    early = [r for r in updates if r["reg_step"] <= deadline / 2]
    assert early and all(r["zero_cut"] <= TARGET * (r["reg_step"] + horizon) / deadline + 0.1 for r in early), \
        [(r["reg_step"], r["zero_cut"]) for r in early]
    assert all({"zero_cut", "zero_cut_ref", "live_rank", "live_channels"} <= set(r) for r in updates)
    assert records[-1]["frozen_step"] == ctrl.frozen_step
    assert method.epoch_stats(model, SIZE)["zero_cut"] == pytest.approx(cut)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_zero_groups_stay_zero_with_their_optimizer_state(kind):
    method, model, opt, _, (x, y) = _controlled(kind, 0.05 if kind == "sgd" else 1e-3, steps=STEPS)
    held = method.controller.held
    assert method.controller.frozen_step is not None
    assert any(bool(c.any()) or bool(r.any()) for c, r in held.values())
    cut = _zero_cut(method)
    live_before = {e.name: e.block.beta_2d().clone() for e in method.reg.entries}
    for _ in range(8):   # the rest trains on; weight decay and the moments would revive the held groups
        _train_step(model, opt, x, y)
        method.after_step(model, 0.05, epoch=0)
    assert _zero_cut(method) == cut
    moved = False
    for e in method.reg.entries:
        cols, rows = held[e.name]
        beta = e.block.beta_2d()
        assert not bool(beta[:, cols].any()) and not bool(beta[rows, :].any())
        for p in e.row_params:
            assert not bool(p[rows].any())
        st = opt.state[e.block.coeff.weight]
        for key in OPTIMIZER_STATE_KEYS:
            if key in st:
                assert not bool(st[key].view(beta.shape)[:, cols].any())
                assert not bool(st[key].view(beta.shape)[rows, :].any())
        moved |= not torch.equal(beta, live_before[e.name])
    assert moved      # the live groups still train (no prox on them: only the optimizer)


def test_pm_after_a_controlled_run_is_exact_and_reports_the_zero_share():
    method, model, opt, _, (x, _) = _controlled("sgd", 0.05, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        before = model(x)
    report = method.prune(model, SIZE).report
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, rtol=1e-10, atol=1e-10)
    assert report["lossless"] and report["budget_removed_groups"] == 0
    assert report["r_flops_from_zero_groups"] >= 0.95 * TARGET
    assert report["zero_share_of_target"] == pytest.approx(report["r_flops_from_zero_groups"] / TARGET)
    assert TARGET <= report["achieved_r_flops"] <= TARGET + TOL


def test_too_few_steps_falls_back_to_the_budget_with_a_warning(caplog):
    """The phase ends (PM) long before the controller's deadline: PM tops the cut up and says how much came from
    zeros."""
    method, model, _, _, _ = _controlled("adamw", 1e-4, steps=3, total=1000)
    assert method.controller.frozen_step is None
    with caplog.at_level(logging.WARNING, logger="edp_det.methods.edp"):
        report = method.prune(model, SIZE).report
    assert not report["lossless"] and report["budget_removed_groups"] > 0
    assert TARGET <= report["achieved_r_flops"]
    assert "groups trained to zero cut only" in caplog.text and "not reached in the regularised phase" in caplog.text


def test_flops_weights_zero_costlier_groups_first():
    """Two column groups of equal norm in layers whose groups save different FLOPs: under the FLOPs weight the
    costlier one reaches zero first; under the uniform penalty they shrink alike."""
    model = tiny(torch.float64)
    from edp_det.edp.decompose import decompose
    decompose(model)
    struct = structure_from_model(model, input_size=SIZE)
    costs = struct.group_costs()
    names = [l.name for l in struct.layers]
    cheap = min(names, key=lambda n: costs[n][0])
    dear = max(names, key=lambda n: costs[n][0])
    assert costs[dear][0] > costs[cheap][0]
    w = group_weights(struct, "flops")
    assert w[dear][0] / w[cheap][0] == pytest.approx(costs[dear][0] / costs[cheap][0])
    assert all(v == (1.0, None if c[1] is None else 1.0) for v, c in
               zip(group_weights(struct, "uniform").values(), costs.values()))
    blocks = {l.name: l.block for l in struct.layers}
    with torch.no_grad():
        for n in (cheap, dear):
            blocks[n].beta_2d()[:, 0] = 0
            blocks[n].beta_2d()[0, 0] = 1.0      # column 0: norm 1 in both layers
    for mode, expect_dear, expect_cheap in (("flops", True, False), ("uniform", False, False)):
        m = build_method("edp", {"epoch_es": 1, "flops_target": TARGET, "regularization": "fixed",
                                 "group_weight": mode, "lambda_rank": 1.0, "lambda_channel": 0.0}, 2)
        import copy
        mm = copy.deepcopy(model)
        m.input_size = SIZE
        m.attach(mm, torch.optim.SGD(mm.parameters(), lr=0.1))
        # a threshold between the two weighted penalties: 1 < lr·λ·w_dear, lr·λ·w_cheap < 1
        lr = 2.0 / (w[dear][0] + w[cheap][0]) if mode == "flops" else 0.5
        m.after_step(mm, lr, epoch=0)
        got = {n: dict(mm.named_modules())[n].beta_2d()[:, 0].norm().item() == 0 for n in (cheap, dear)}
        assert got[dear] is expect_dear and got[cheap] is expect_cheap, (mode, got)


def test_bad_values_fail_clearly():
    model = tiny(torch.float32)
    from edp_det.edp.decompose import decompose
    decompose(model)
    struct = structure_from_model(model, input_size=SIZE)
    reg = EDPRegularizer(model, 1.0, 1.0)
    name = struct.layers[0].name
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            group_weights(struct, "latency", {name: bad})
        with pytest.raises(ValueError, match="finite number ≥ 0"):
            TargetController(reg, struct, 0.4, 10, weights={name: (bad, 1.0)})
    with pytest.raises(ValueError, match="needs the layers' time"):
        group_weights(struct, "latency")
    with pytest.raises(ValueError, match="group_weight must be one of"):
        group_weights(struct, "params")
    with pytest.raises(ValueError, match="≥ 1 step"):
        TargetController(reg, struct, 0.4, 0)
    # rank groups only, in a network whose residual-tied layers keep their channels: not every cut is reachable
    with pytest.raises(BudgetError, match="cannot be reached by regularisation"):
        TargetController(reg, struct, 0.99, 10, kinds=("col",))
    # the controlled mode needs the phase length and the FLOPs input size
    method = build_method("edp", {"epoch_es": 1, "flops_target": 0.4, **TARGET_MODE}, 2)
    m = method.prepare(tiny(torch.float32))
    method.attach(m, torch.optim.SGD(m.parameters(), lr=0.01))
    with pytest.raises(ValueError, match="iters_per_epoch"):
        method.after_step(m, 0.01, epoch=0)
    method.iters_per_epoch = 5
    with pytest.raises(ValueError, match="input_size"):
        method.after_step(m, 0.01, epoch=0)


@pytest.mark.parametrize("key,value", [("round_to", 8), ("max_layer_cut", 0.75), ("latency", {"aware": True}),
                                       ("latency", {"weights": "w.json"}), ("stop_reg_at_target", False)])
def test_an_option_of_the_pm_budget_is_an_error_when_training_chooses_the_groups(tmp_path, key, value):
    if key == "latency" and "weights" in value:
        (tmp_path / "w.json").write_text('{"conv1": 1.0}')
        value = {"weights": str(tmp_path / "w.json")}
    cfg = {"epoch_es": 1, "flops_target": 0.4, key: value}
    # the default regularisation with a flops_target is the controller: the option would steer nothing it chooses
    # (round_to would even remove trained groups by rounding the live counts down)
    name = f"compress.{key}" + (f".{next(iter(value))}" if isinstance(value, dict) else "")
    with pytest.raises(ValueError, match=f"{name}=.*compress.regularization=fixed") as e:
        build_method("edp", cfg, 2)
    assert len(str(e.value).splitlines()) == 1
    # the fixed regularisation leaves the choice to the PM budget: accepted there
    assert build_method("edp", {**cfg, "regularization": "fixed"}, 2).target_driven is False
    # ... and so is it without a target to drive to (flops_target null: PM removes only the zeros)
    assert build_method("edp", {**cfg, "flops_target": None}, 2).target_driven is False


def test_without_target_the_regularisation_is_fixed():
    method = build_method("edp", {"epoch_es": 1, "flops_target": None, "group_weight": "uniform",
                                  "lambda_rank": 0.5, "lambda_channel": 0.5}, 2)
    m = method.prepare(tiny(torch.float32))
    method.attach(m, torch.optim.SGD(m.parameters(), lr=0.01))
    method.after_step(m, 0.01, epoch=0)
    assert method.controller is None and all(e.lam_col == 0.5 for e in method.reg.entries)
    assert count_flops(m, input_size=SIZE).flops > 0


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_strongest_group_of_every_layer_and_kind_is_never_zeroed(kind):
    """One layer's groups weigh 10⁴ times the others': the controller would zero every rank and channel of it
    (the next BatchNorm then normalises a zero signal); it keeps the strongest group of each layer and kind, as
    the PM budget does, and still reaches the target."""
    from edp_det.edp.decompose import decompose
    model = tiny(torch.float32).train()
    decompose(model)
    x, y = _batch(torch.float32)
    opt = _optimizer(model, kind, 0.05 if kind == "sgd" else 1e-3)
    struct = structure_from_model(model, input_size=SIZE)
    weights = group_weights(struct, "uniform")
    victims = [l.name for l in struct.layers if l.prunable][:2]
    for name in victims:
        weights[name] = (1e4, 1e4)
    reg = EDPRegularizer(model, 1.0, 1.0, optimizer=opt)
    ctrl = TargetController(reg, struct, TARGET, STEPS, weights=weights, optimizer=opt)
    for _ in range(STEPS):
        _train_step(model, opt, x, y)
        ctrl.step()
    assert ctrl.frozen_step is not None
    struct.refresh()
    assert TARGET <= flops_cut(struct.original_flops, struct.flops_after()) <= TARGET + TOL
    for e in reg.entries:
        beta = e.block.beta_2d()
        assert bool((beta != 0).any(dim=0).any()), f"every rank of {e.name} was zeroed"
        if e.block.channel_prunable:
            rows = (beta != 0).any(dim=1)
            for p in e.row_params:
                rows |= p != 0
            assert bool(rows.any()), f"every channel of {e.name} was zeroed"
    # the weighted layers lost all their groups but the strongest of each kind
    for name in victims:
        beta = dict(model.named_modules())[name].beta_2d()
        assert int((beta != 0).any(dim=0).sum()) == 1, name
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("kind,lr", [("sgd", 0.05), ("adamw", 1e-3), ("adamw", 1e-5)])
def test_only_fading_groups_change_each_fades_linearly_and_dies_at_its_step(kind, lr):
    """After the optimizer step the controller changes only the fading groups, each by (d − t)/(d − t + 1) of its
    current weights (float64-exact), so that it is exactly zero at its death step d; every other group keeps its
    weights. The pace is the schedule's, not the optimizer's: the same under SGD and AdamW at any lr."""
    from edp_det.edp.decompose import decompose
    model = tiny(torch.float64).train()
    decompose(model)
    x, y = _batch(torch.float64)
    opt = _optimizer(model, kind, lr)
    struct = structure_from_model(model, input_size=SIZE)
    reg = EDPRegularizer(model, 1.0, 1.0, optimizer=opt)
    ctrl = TargetController(reg, struct, TARGET, 50, weights=group_weights(struct, "uniform"), optimizer=opt)
    faded, died = 0, 0
    for _ in range(50):
        _train_step(model, opt, x, y)
        before = {e.name: (e.block.beta_2d().clone(), [p.clone() for p in e.row_params]) for e in reg.entries}
        ctrl.step()
        if ctrl.frozen_step is not None:
            break
        t = ctrl.t
        for e in reg.entries:
            dc, dr = ctrl.death[e.name]
            if not e.block.channel_prunable:
                dr = torch.full_like(dr, float("inf"))
            beta0, rows0 = before[e.name]
            cf = torch.where(torch.isfinite(dc), (dc - t).clamp_min(0) / ((dc - t).clamp_min(0) + 1), 1.0)
            rf = torch.where(torch.isfinite(dr), (dr - t).clamp_min(0) / ((dr - t).clamp_min(0) + 1), 1.0)
            expected = beta0 * cf[None, :]
            expected = expected * rf[:, None]
            assert torch.equal(e.block.beta_2d(), expected), f"{e.name}: not the linear fade of the fading groups"
            for p, p0 in zip(e.row_params, rows0):
                assert torch.equal(p, p0 * rf), f"{e.name}: row parameters outside the fade changed"
            beta = e.block.beta_2d()
            live_fading = torch.isfinite(dc) & (dc > t) & (beta0 != 0).any(dim=0)
            faded += int(live_fading.sum())
            dying = (dc == t) & (beta0 != 0).any(dim=0)
            assert not bool(beta[:, dying].any()), f"{e.name}: a group is not zero at its death step"
            died += int(dying.sum())
    assert ctrl.frozen_step is not None and faded > 0 and died > 0
    assert TARGET <= _zero_cut_of(struct) <= TARGET + TOL


def _zero_cut_of(struct):
    struct.refresh()
    return flops_cut(struct.original_flops, struct.flops_after())


@pytest.mark.parametrize("weight", ["flops", "uniform"])
def test_target_mode_trains_the_tiny_classifier_to_finite_results(tmp_path, weight):
    """End to end through the engine (tools/train_cls.py, the tiny ResNet-18 classifier): under the controlled
    mode the FLOPs target is met, every logged loss is finite and the pruned model's accuracy is a number (an
    emptied layer made the loss non-finite right after PM). PM runs at the end of the epoch in which the zero groups
    reached the target (the first of epoch_es = 2 here), removing only zeros, and the rest trains pruned."""
    import json
    import math

    from _cls_helpers import CLS_OVERRIDES, TINY_CLS, make_cls_data, run_tool

    data = make_cls_data(tmp_path / "data")
    out = tmp_path / "run"
    rc = run_tool("train_cls", ["--config", str(TINY_CLS), "--data-root", str(data), "--output-dir", str(out),
                                "--log-level", "WARNING", *CLS_OVERRIDES, "compress.regularization=target",
                                f"compress.group_weight={weight}"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.40 <= m["r_flops"] <= 0.42 and math.isfinite(m["top1"])
    records = [json.loads(line) for line in (out / "metrics_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any("zero_cut" in r for r in records)
    ends = [r for r in records if r.get("phase") == "end_epoch"]
    steps_per_epoch = max(r["iter"] for r in records if "iter" in r)
    frozen = ends[0]["frozen_step"]
    assert 1 <= frozen <= steps_per_epoch        # reached in epoch 1 of the 2 regularised
    assert ends[0].get("pruned") is True and [r["regularized"] for r in ends] == [True, False, False]
    pm = json.loads((out / "pm_report.json").read_text())
    assert pm["lossless"] and pm["zero_share_of_target"] >= 1.0


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_rank_layers_tied_leaves_the_rank_of_channel_prunable_layers_whole(kind):
    """``rank_layers: tied``: training cuts channel-prunable layers by channels only (no rank group of theirs fades
    or dies) and the residual-tied layers by rank, reaches the target, and PM removes only zeros."""
    method, model, opt, records, _ = _controlled(kind, 0.05 if kind == "sgd" else 1e-3, dtype=torch.float64,
                                                 extra={"rank_layers": "tied"})
    assert method.controller.frozen_step is not None
    assert TARGET <= _zero_cut(method) <= TARGET + TOL
    rank_cut = {False: 0, True: 0}
    for e in method.reg.entries:
        beta = e.block.beta_2d()
        dead_cols = int((beta == 0).all(dim=0).sum())
        rank_cut[e.block.channel_prunable] += dead_cols
    assert rank_cut[True] == 0 and rank_cut[False] > 0, rank_cut
    assert any(r.get("fading_channels", 0) > 0 for r in records)
    report = method.prune(model, SIZE).report
    assert report["lossless"] and report["budget_removed_groups"] == 0


def test_a_resumed_frozen_controller_holds_the_same_zero_groups_from_its_first_step():
    """Resume after the target was reached: the first optimizer step of the resumed run moves the held groups (their
    optimizer state is zero, so AdamW's first step is about lr per weight); the held masks come from the checkpoint,
    so the controller sets them back to zero and the zero-group cut is the one that was saved."""
    method, model, opt, _, (x, y) = _controlled("adamw", 1e-3)
    assert method.controller.frozen_step is not None
    cut = _zero_cut(method)
    state = method.state_dict()
    resumed = build_method("edp", {"epoch_es": 1, "flops_target": TARGET, **TARGET_MODE}, total_epochs=2)
    resumed.load_state_dict(state)
    resumed.input_size, resumed.iters_per_epoch = SIZE, STEPS
    resumed.attach(model, opt)
    _train_step(model, opt, x, y)
    resumed.after_step(model, 1e-3, epoch=0)
    assert _zero_cut(resumed) == cut
    for e in resumed.reg.entries:
        cols, rows = method.controller.held[e.name]
        beta = e.block.beta_2d()
        assert not bool(beta[:, cols].any()) and not bool(beta[rows, :].any())


def test_measured_group_weights_are_kept_for_a_resume_and_saved_for_reuse(tmp_path, monkeypatch):
    """``group_weight: latency`` measures each layer's time per FLOP once: the method state carries it (a resumed
    run weighs the groups by the same measurement instead of a new, different one), ``pm_report.json`` holds it as
    ``layer_weights`` (PM tops the cut up with it) and that file is accepted as ``compress.latency.weights``."""
    import edp_det.methods.edp as edp_method

    cfg = {"epoch_es": 1, "flops_target": TARGET, **TARGET_MODE, "group_weight": "latency", "latency": {"batch": 1}}
    method, model, opt, _, (x, y) = _controlled("adamw", 1e-3, extra=cfg)
    measured = method.state_dict()["layer_time"]
    assert set(measured) == {e.name for e in method.reg.entries}
    assert all(math.isfinite(v) and v > 0 for v in measured.values())

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed run measured the layers again")

    monkeypatch.setattr(edp_method, "measure_time_per_flop", no_measuring)
    resumed = build_method("edp", cfg, total_epochs=2)
    resumed.load_state_dict(method.state_dict())
    resumed.input_size, resumed.iters_per_epoch = SIZE, STEPS
    resumed.attach(model, opt)
    _train_step(model, opt, x, y)
    resumed.after_step(model, 1e-3, epoch=0)
    assert resumed.state_dict()["layer_time"] == measured
    report = resumed.prune(model, SIZE).report
    assert report["layer_weights"] == measured
    saved = tmp_path / "pm_report.json"
    saved.write_text(json.dumps(report))
    again = build_method("edp", {**cfg, "latency": {"weights": str(saved)}}, total_epochs=2)
    assert again.latency_weights == measured


def test_the_prune_epoch_is_the_engine_epoch_that_reached_the_target():
    """PM follows the epoch the engine was in when the controller reached the target, whatever the steps per epoch
    say: here the method is told 4 steps per epoch while the "engine" passes 2 steps per epoch (as when optimizer
    steps are skipped, e.g. by AMP, or a run resumes with another world size); the prune epoch comes from the epoch
    argument and survives a save/load of the method state."""
    model = tiny(torch.float32).train()
    x, y = _batch(torch.float32)
    method = build_method("edp", {"epoch_es": 12, "flops_target": TARGET, **TARGET_MODE}, total_epochs=14)
    model = method.prepare(model)
    method.input_size, method.iters_per_epoch = SIZE, 4
    opt = _optimizer(model, "adamw", 1e-3)
    method.attach(model, opt)
    step = 0
    while method.controller is None or method.controller.frozen_step is None:
        _train_step(model, opt, x, y)
        method.after_step(model, 1e-3, epoch=step // 2)     # two steps per engine epoch
        step += 1
        assert step <= 48
    reached = (step - 1) // 2 + 1
    assert method.prune_epoch == reached == method.target_epoch
    assert math.ceil(method.controller.frozen_step / 4) != reached      # the step count would misplace it
    again = build_method("edp", {"epoch_es": 12, "flops_target": TARGET, **TARGET_MODE}, total_epochs=14)
    again.iters_per_epoch = 4
    again.load_state_dict(method.state_dict())
    assert again.prune_epoch == reached


def test_a_run_resumed_mid_ramp_continues_exactly():
    """A checkpoint taken while groups are still fading holds their death steps: the resumed run (model, optimizer
    and method state restored, a new controller) fades the same groups on the same steps and ends bit-identical to
    the uninterrupted run (float64)."""
    import copy

    def setup(model):
        method = build_method("edp", {"epoch_es": 1, "flops_target": TARGET, **TARGET_MODE}, total_epochs=2)
        model = method.prepare(model)
        method.input_size, method.iters_per_epoch = SIZE, STEPS
        return method, model

    x, y = _batch(torch.float64)
    method, model = setup(tiny(torch.float64).train())
    opt = _optimizer(model, "adamw", 1e-3)
    method.attach(model, opt)
    saved = None
    for step in range(STEPS):
        if step == 4:       # deadline at STEPS / 4 = 7.5: mid-ramp, groups fading, none frozen
            assert method.controller.frozen_step is None
            assert any(bool(torch.isfinite(dc).any()) for dc, _ in method.controller.death.values())
            saved = (copy.deepcopy(model), copy.deepcopy(opt.state_dict()), copy.deepcopy(method.state_dict()))
        _train_step(model, opt, x, y)
        method.after_step(model, 1e-3, epoch=0)
    assert method.controller.frozen_step is not None
    resumed_model, opt_state, method_state = saved
    resumed, _ = setup(tiny(torch.float64).train())      # a fresh method on the saved decomposed model
    resumed.load_state_dict(method_state)
    resumed.input_size, resumed.iters_per_epoch = SIZE, STEPS
    opt2 = _optimizer(resumed_model, "adamw", 1e-3)
    opt2.load_state_dict(opt_state)
    resumed.attach(resumed_model, opt2)
    for _ in range(4, STEPS):
        _train_step(resumed_model, opt2, x, y)
        resumed.after_step(resumed_model, 1e-3, epoch=0)
    assert resumed.controller.frozen_step == method.controller.frozen_step
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
