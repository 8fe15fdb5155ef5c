"""The comparison grid: seeds, the trained-start protocol (starting weights checked on the weights), parallel runs,
failed runs, reruns, bad input and the paired statistics against hand computations."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from edp_det.harness.compare import (check_grid, grid_record, parse_seeds, plan_grid, planned_config,
                                     run_comparison)
from edp_det.harness.report import format_paired_table
from edp_det.harness.stats import (detectable_difference, paired_difference, power, seeds_needed, spread,
                                   verdict)
from edp_det.runtime.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs" / "tiny_synthetic.yaml")
# seconds per run: one step per epoch, 64 px, light heads, no benchmark
FAST = ["train.max_iters_per_epoch=1", "model.min_size=64", "model.max_size=64", "benchmark.enabled=false",
        "train.epochs=2", "model.fpn_out_channels=32", "model.representation_size=64",
        "compress.schedule.epochs=2", "compress.schedule.epoch_es=1", "eval.batch_size=6"]


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_interval_matches_hand_computation():
    a = {0: 0.51, 1: 0.53, 2: 0.52}
    b = {0: 0.50, 1: 0.50, 2: 0.50, 3: 0.9}          # seed 3 has no partner: left out
    d = paired_difference(a, b)
    assert d.n == 3 and d.seeds == (0, 1, 2)
    assert d.mean == pytest.approx(0.02)
    # differences [0.01, 0.03, 0.02]: s = 0.01, t(0.975, 2) = 4.303
    assert d.half_width == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-4)
    assert verdict(d) == "indistinguishable"                      # [-0.0048, 0.0448] holds 0
    better = paired_difference({0: 0.60, 1: 0.61, 2: 0.62}, {0: 0.50, 1: 0.50, 2: 0.50})
    assert verdict(better) == "better" and better.low > 0
    worse = paired_difference({0: 0.40, 1: 0.41}, {0: 0.50, 1: 0.50})
    # n = 2: s = 0.00707, t(0.975, 1) = 12.706 -> half width 0.0635; mean -0.095
    assert worse.half_width == pytest.approx(12.706 * (0.01 / math.sqrt(2)) / math.sqrt(2), rel=1e-4)
    assert verdict(worse) == "worse"
    assert verdict(paired_difference({0: 0.4}, {0: 0.5})) == "undetermined"
    sp = spread([0.70, 0.72, 0.74])
    assert (sp.mean, sp.n, sp.min, sp.max) == (pytest.approx(0.72), 3, 0.70, 0.74)
    assert sp.std == pytest.approx(0.02)


def test_seeds_needed_matches_the_matched_pairs_power_table():
    """Sample sizes of the two-sided paired t-test at α = 0.05 and 80 % power for effect sizes d = δ/s of 0.2, 0.3,
    0.5 and 0.8 (Cohen's table; G*Power's "matched pairs": 199, 90, 34, 15), at any scale; the test's size at
    δ = 0 is α."""
    for d, n in ((0.2, 199), (0.3, 90), (0.5, 34), (0.8, 15)):
        assert seeds_needed(d, 1.0) == n
        assert seeds_needed(-d * 0.01, 0.01) == n                  # sign and scale do not matter
        assert power(d, 1.0, n) >= 0.8 > power(d, 1.0, n - 1)
    assert power(0.0, 0.03, 13) == pytest.approx(0.05, abs=1e-9)
    # few seeds, where n − 1 degrees of freedom against n matters (independently computed: 6, 5, 4, 3; with df = n
    # the answers would be 6, 4, 3, 2)
    assert [seeds_needed(d, 1.0) for d in (1.5, 2.0, 3.0, 5.0)] == [6, 5, 4, 3]
    assert seeds_needed(0.01, 0.0) == 2 and seeds_needed(0.0, 0.02) is None
    assert seeds_needed(1e-6, 1.0) is None                         # beyond the limit


def test_detectable_difference_has_the_stated_power():
    """At the detectable difference the power is 80 % (solved to 1e-9), it shrinks like 1/√n for many seeds (the
    normal approximation (z₀.₉₇₅ + z₀.₈)·s/√n within 1 %), and a simulation of paired t-tests at that difference
    rejects in 80 % ± 1.5 % of 20 000 grids."""
    import numpy as np
    from scipy.stats import norm, t

    assert detectable_difference(1.0, 2) == pytest.approx(11.5499, rel=1e-4)
    assert detectable_difference(1.0, 3) == pytest.approx(3.2640, rel=1e-4)
    s = 0.028
    for n in (2, 3, 13, 60):
        d = detectable_difference(s, n)
        assert power(d, s, n) == pytest.approx(0.8, abs=1e-9)
        if n > 2:
            assert d < detectable_difference(s, n - 1)
    big = detectable_difference(s, 2000)
    assert big == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * s / math.sqrt(2000), rel=0.01)
    n = 10
    delta = detectable_difference(1.0, n)
    x = np.random.default_rng(0).normal(delta, 1.0, size=(20_000, n))
    tstat = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
    rate = float((np.abs(tstat) > t.ppf(0.975, n - 1)).mean())
    assert rate == pytest.approx(0.8, abs=0.015)
    d13 = paired_difference({k: 0.70 + 0.01 * (k % 3) for k in range(13)}, {k: 0.70 for k in range(13)})
    assert d13.detectable() == pytest.approx(detectable_difference(d13.std, 13))
    assert d13.seeds_for(0.01) == seeds_needed(0.01, d13.std)
    for bad in ((-0.1, 5), (float("nan"), 5), (0.1, 1)):
        with pytest.raises(ValueError):
            detectable_difference(*bad)
    with pytest.raises(ValueError, match="power"):
        detectable_difference(0.1, 5, power_=1.0)
    with pytest.raises(ValueError, match="standard deviation"):
        seeds_needed(0.01, -0.02)
    with pytest.raises(ValueError, match="power"):
        detectable_difference(0.1, 5, power_=0.03)                # below the test's size
    # differences equal up to float rounding: a spread of 1e-16, where scipy's noncentral t gives NaN
    tiny = paired_difference({0: 0.7312, 1: 0.70}, {0: 0.7312, 1: 0.7000000000000001})
    assert 0 < tiny.std < 1e-15
    assert power(0.01, tiny.std, 100_000) == 1.0 and tiny.seeds_for(0.01) == 2


def test_paired_table_shows_what_the_seeds_can_detect():
    """The paired table gives, next to each interval, the difference its seeds detect with 80 % power and the
    seeds one point needs; with one seed neither exists."""
    a = {0: 0.51, 1: 0.53, 2: 0.52}
    b = {0: 0.50, 1: 0.50, 2: 0.50}
    d = paired_difference(a, b)
    text = format_paired_table("vs x", [("g", d), ("one", paired_difference({0: 0.4}, {0: 0.5})), ("none", None)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert "detectable Δ (80 % power)" in text
    assert rows["g"][5] == f"±{detectable_difference(0.01, 3):.3f}"
    assert rows["g"][6].strip(" |") == str(seeds_needed(0.01, 0.01))
    assert rows["one"][5:] == ["-", "- |"] and rows["none"][5:] == ["-", "- |"]


# ------------------------------------------------------------------------------------------------ bad input
def _tool():
    spec = importlib.util.spec_from_file_location("compare_tool", REPO_ROOT / "tools" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", ""], "--seeds"), (["--seeds", "0,a"], "--seeds"), (["--seeds", "1,1"], "--seeds"),
    (["--jobs", "0"], "--jobs"), (["--seeds", "0,-1"], "--seeds"), (["--report-only"], "--report-only"),
    (["--start", "trained", "compress.schedule.epochs=2", "compress.schedule.epoch_es=3"],
     "compress.schedule.epoch_es"),
])
def test_bad_grid_input_is_one_line_exit_2(tmp_path, capsys, argv, needle, restore_logging):
    from edp_det.harness.cli import cli_main

    tool = _tool()
    args = tool.get_args_parser().parse_args(["--config", TINY, "--methods", "edp", "--flops-targets", "0.4",
                                              "--output-dir", str(tmp_path / "g"), *argv])
    with pytest.raises(SystemExit) as e:
        cli_main(tool.main, args, "compare")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    if needle.startswith("--"):                              # the tool's own arguments are checked before it logs
        assert not (tmp_path / "g").exists()


def test_trained_start_adds_baseline_and_control():
    plan, notes = plan_grid(["edp", "slimming"], [0.4], [0, 1], "trained")
    assert notes and "baseline added" in notes[0]
    names = [r.name for r in plan]
    assert names[:2] == ["baseline/seed0", "baseline/seed1"]          # starting points first
    assert {"control/seed0", "control/seed1", "edp_0.4/seed1", "slimming_0.4/seed0"} <= set(names)
    assert all(r.start_from == f"baseline/seed{r.seed}" for r in plan if r.group != "baseline")
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("0,,1")
    with pytest.raises(ValueError, match="--seeds '0,-1': seeds are integers ≥ 0"):
        parse_seeds("0,-1")
    with pytest.raises(ValueError, match="--flops-targets: a target is repeated"):
        plan_grid(["edp"], [0.4, 0.4], [0], "trained")


def test_a_grid_never_writes_into_its_dataset(tmp_path, monkeypatch, synthetic_voc):
    """The check is made on each run's own folder: a grid inside the data root is refused before it starts, a grid
    elsewhere is not, wherever the command runs from."""
    plan, _ = plan_grid(["baseline"], [], [0], "scratch")
    with pytest.raises(ConfigError, match="inside data.root"):
        planned_config(TINY, plan[0], synthetic_voc / "grid", data_root=synthetic_voc)
    monkeypatch.chdir(synthetic_voc)
    cfg = planned_config(TINY, plan[0], tmp_path / "grid", data_root=synthetic_voc)
    assert cfg["output_dir"] == str(tmp_path / "grid" / "baseline" / "seed0")


def test_grid_made_with_another_config_is_refused(tmp_path):
    from edp_det.harness.compare import comparison_config

    out = tmp_path / "g"
    out.mkdir()
    rec = grid_record(comparison_config(TINY, "baseline", None, overrides=["train.epochs=2"]), "scratch")
    (out / "grid.json").write_text(json.dumps(rec))
    check_grid(out, grid_record(comparison_config(TINY, "baseline", None, overrides=["train.epochs=2"]), "scratch"),
               TINY)
    with pytest.raises(ConfigError, match=r"--config .*another config.*train\.epochs.*new --output-dir"):
        check_grid(out, grid_record(comparison_config(TINY, "baseline", None, overrides=["train.epochs=3"]),
                                    "scratch"), TINY)
    with pytest.raises(ConfigError, match="--start trained"):
        check_grid(out, grid_record(comparison_config(TINY, "baseline", None, overrides=["train.epochs=2"]),
                                    "trained"), TINY)


# ------------------------------------------------------------------------------------------------ seeds
def _initial_state(cfg, out):
    from edp_det.runtime.distributed import init_distributed
    from edp_det.train.detection import DetectionTask
    from edp_det.train.engine import Trainer

    t = Trainer(cfg, DetectionTask(cfg), out)
    t.setup()
    batch = next(iter(t.task.train_loader(0, init_distributed())))
    return {k: v.clone() for k, v in t.model.state_dict().items()}, [tg["boxes"] for tg in batch[1]]


def test_seed_drives_initialisation_and_data(synthetic_voc, tmp_path):
    from edp_det.harness.compare import PlannedRun

    states = {}
    for i, seed in enumerate((0, 0, 1)):
        run = PlannedRun(f"baseline/seed{seed}", "baseline", "baseline", None, seed)
        cfg = planned_config(TINY, run, tmp_path / f"g{i}", synthetic_voc, FAST)
        assert cfg["seed"] == seed and cfg["output_dir"].endswith(f"baseline/seed{seed}")
        states[i] = _initial_state(cfg, cfg["output_dir"])
    (w0, b0), (w0b, b0b), (w1, b1) = states[0], states[1], states[2]
    assert all(torch.equal(w0[k], w0b[k]) for k in w0)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    assert all(torch.equal(x, y) for x, y in zip(b0, b0b))
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(b0, b1))


# ------------------------------------------------------------------------------------------------ trained start
def test_trained_start_grid(synthetic_voc, tmp_path, restore_logging):
    """Per seed the baseline trains once; control and compressed runs start from that seed's final weights (checked
    on the weights and, after EDP's decomposition, on the outputs); the report holds the seed statistics, paired
    differences and the reproducibility record; a rerun trains nothing."""
    from edp_det.harness.compare import collect_runs
    from edp_det.methods import build_method
    from edp_det.models import read_state_dict
    from edp_det.ops.adapter import body_of
    from edp_det.runtime.distributed import init_distributed
    from edp_det.train.detection import DetectionTask

    out = tmp_path / "grid"
    res = run_comparison(TINY, ["edp", "slimming"], [0.4], out, data_root=synthetic_voc, overrides=FAST,
                         seeds=[0, 1], start="trained", command="pytest")
    assert set(res["runs"].values()) == {"done"} and len(res["runs"]) == 8 and not res["failed"]
    for seed in (0, 1):
        for group in ("control", "edp_0.4", "slimming_0.4"):
            cfg = json.loads(json.dumps(collect_runs(out)[f"{group}/seed{seed}"].config))
            assert cfg["model"]["weights"] == str(out / f"baseline/seed{seed}" / "model_final.pt")
            assert cfg["train"]["epochs"] == 2 and cfg["compress"]["epoch_es"] == 1
    # the weights a compressed run of seed 1 starts from are the seed-1 baseline's final weights
    run = next(r for r in plan_grid(["edp"], [0.4], [0, 1], "trained")[0] if r.name == "edp_0.4/seed1")
    cfg = planned_config(TINY, run, out, synthetic_voc, FAST)
    task = DetectionTask(cfg)
    task.setup(init_distributed())
    model = task.build_model()
    final = read_state_dict(out / "baseline/seed1/model_final.pt", "test")
    other = read_state_dict(out / "baseline/seed0/model_final.pt", "test")
    own = model.state_dict()
    assert all(torch.equal(own[k], final[k]) for k in final)
    assert any(not torch.equal(final[k], other[k]) for k in final if final[k].is_floating_point())
    body = body_of(model).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = body(x)
        decomposed = build_method("edp", cfg["compress"], cfg["train"]["epochs"]).prepare(model)
        got = body_of(decomposed).eval()(x)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-4, rtol=1e-4)
    text = res["report"].read_text()
    for needle in ("## Over seeds", "## Paired differences", "vs edp_0.4 at 40% FLOPs target",
                   "vs control at 40% FLOPs target", "At 40%, against edp_0.4", "## Reproducibility",
                   "config hash", "torchvision", "| slimming_0.4/seed1 | done |"):
        assert needle in text, needle
    # rerun: everything finished, nothing trains
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/metrics.json")}
    again = run_comparison(TINY, ["edp", "slimming"], [0.4], out, data_root=synthetic_voc, overrides=FAST,
                           seeds=[0, 1], start="trained", build=False)
    assert set(again["runs"].values()) == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_model_final_as_weights_checks_architecture(synthetic_voc, tmp_path, restore_logging):
    """A model_final.pt of our own training loads as model.weights; another architecture or a compressed model is
    an error naming model.weights."""
    from edp_det.harness.run_config import resolve_config
    from edp_det.runtime.distributed import init_distributed
    from edp_det.train.detection import DetectionTask

    out = tmp_path / "g"
    run_comparison(TINY, ["baseline", "slimming"], [0.4], out, data_root=synthetic_voc, overrides=FAST, build=False)

    def build(weights, *extra):
        cfg = resolve_config(TINY, FAST + [f"model.weights={weights}", *extra], task="detection",
                             data_root=synthetic_voc, output_dir=tmp_path / "x")
        task = DetectionTask(cfg)
        task.setup(init_distributed())
        return task.build_model()

    build(out / "baseline" / "model_final.pt")
    with pytest.raises(ValueError, match="model.weights.*model.fpn_out_channels"):
        build(out / "baseline" / "model_final.pt", "model.fpn_out_channels=16")
    with pytest.raises(ValueError, match="model.weights is a compressed model"):
        build(out / "slimming_0.4" / "model_final.pt")


# ------------------------------------------------------------------------------------------------ parallel
def test_parallel_runs_overlap_and_a_failed_run_is_reported(synthetic_voc, tmp_path, restore_logging):
    out = tmp_path / "par"
    bad = out / "l1_filter_0.4" / "seed0"
    bad.mkdir(parents=True)
    (bad / "checkpoint_e1.pt").write_bytes(b"not a checkpoint")
    (bad / "last_checkpoint").write_text("checkpoint_e1.pt")
    res = run_comparison(TINY, ["baseline", "slimming", "l1_filter"], [0.4], out, data_root=synthetic_voc,
                         overrides=FAST, seeds=[0], jobs=2)
    assert res["runs"]["baseline/seed0"] == "done" and res["runs"]["slimming_0.4/seed0"] == "done"
    assert res["runs"]["l1_filter_0.4/seed0"] == "failed"
    fail = res["failed"]["l1_filter_0.4/seed0"]
    assert fail["error"].startswith("train_det: ") and fail["log"].endswith("log.txt")
    grid = json.loads((out / "grid.json").read_text())
    assert grid["machine"]["jobs"] == 2 and grid["machine"]["threads_per_run"] >= 1
    a, b = grid["runs"]["baseline/seed0"], grid["runs"]["slimming_0.4/seed0"]
    assert a["started"] < b["ended"] and b["started"] < a["ended"]          # both ran at once
    # the same from the runs' own logs (second resolution)
    def span(run):
        lines = [ln for ln in (out / run / "log.txt").read_text().splitlines() if ln.startswith("[")]
        return lines[0][1:15], lines[-1][1:15]
    (s1, e1), (s2, e2) = span("baseline/seed0"), span("slimming_0.4/seed0")
    assert s1 <= e2 and s2 <= e1
    assert "l1_filter_0.4/seed0 | failed: train_det: " in res["report"].read_text()


def test_a_key_added_later_at_its_default_does_not_make_another_grid(tmp_path):
    import copy
    import json

    from edp_det.harness.compare import check_grid, comparison_config, grid_record
    from edp_det.runtime.errors import ConfigError

    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "tiny_synthetic.yaml"
    record = grid_record(comparison_config(cfg_file, "edp", None, tmp_path), "trained")
    older = copy.deepcopy(record)
    del older["config"]["eval"]["around_pm"]             # written before the option existed
    older["config_hash"] = "0123456789"
    (tmp_path / "grid.json").write_text(json.dumps(older))
    check_grid(tmp_path, record, cfg_file)               # same grid: no error
    changed = copy.deepcopy(record)
    changed["config"]["eval"]["around_pm"] = True        # set to a non-default value: another grid
    changed["config_hash"] = "9876543210"
    with pytest.raises(ConfigError, match="around_pm"):
        check_grid(tmp_path, changed, cfg_file)
