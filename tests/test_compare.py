"""The comparison harness: run planning, the report (table + Fig. 3/4/5 plots) built from stored runs, and a tiny
``tools/compare.py`` run end to end (2 methods × 1 target on synthetic VOC), skipping and resuming runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from edp_det.harness.compare import build_report, collect_runs, layer_counts, plan_runs, run_name
from edp_det.harness.report import comparison_rows, format_comparison_table

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_run(out: Path, name: str, method: str, target, mAP: float, cut: float, pm_layers=None, epochs=None,
               dense=None):
    d = out / name
    d.mkdir(parents=True)
    cfg = {"method": method, "train": {"epochs": 4}, "compress": {"epoch_es": 2, "flops_target": target or 0.4},
           "data": {"root": "/data/voc"}, "model": {"depth": 50}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"method": method, "mAP_voc07": mAP, "r_flops_backbone": cut, "r_flops_detector": cut / 3,
               "params": 40e6 * (1 - cut), "flops_backbone": 1e9 * (1 - cut), "flops_detector": 3e9,
               "input_size": [3, 64, 64]}
    (d / "metrics.json").write_text(json.dumps(metrics))
    if pm_layers is not None:
        pm = {"requested_r_flops": target, "achieved_r_flops": cut, "layers": pm_layers,
              "criterion": "abs(gamma) | global"}
        if dense is not None:
            pm["r_flops_dense"] = dense
        (d / "pm_report.json").write_text(json.dumps(pm))
    if epochs is not None:
        with open(d / "metrics_log.jsonl", "w") as f:
            for e, (sp, sf) in enumerate(epochs, start=1):
                f.write(json.dumps({"epoch": e, "iter": 1, "loss": 1.0}) + "\n")
                f.write(json.dumps({"epoch": e, "phase": "end_epoch", "regularized": e <= 2, "sparse_params": sp,
                                    "sparse_flops": sf}) + "\n")


def _layers(channels, ranks, merged=False):
    return [{"name": f"backbone.body.layer1.{i}.conv1", "kernel": [3, 3], "before": [64, 64, 64],
             "after": [64, r, c], "merged": merged, "flops_before": 10, "flops_after": 5}
            for i, (c, r) in enumerate(zip(channels, ranks))]


@pytest.fixture()
def stored_runs(tmp_path):
    out = tmp_path / "cmp"
    _write_run(out, "baseline", "baseline", None, 0.70, 0.0, epochs=[(None, None)] * 4)
    for t, cut in ((0.4, 0.402), (0.6, 0.604)):
        _write_run(out, f"edp_{t:g}", "edp", t, 0.69 - t / 10, cut, _layers([60, 40], [30, 20]),
                   epochs=[(0.1, 0.12), (0.3, 0.35)])
        _write_run(out, f"slimming_{t:g}", "slimming", t, 0.68 - t / 10, cut, _layers([50, 30], [0, 0], True))
        _write_run(out, f"svd_{t:g}", "svd", t, 0.67 - t / 10, cut, _layers([64, 64], [40, 30]))
    _write_run(out, "lrs_0.4", "lrs", 0.4, 0.6, 0.401, _layers([64, 64], [20, 20]), dense=0.0)
    (out / "unfinished_run").mkdir()          # no metrics.json: ignored
    return out


def test_plan_runs_and_names():
    plan = plan_runs(["baseline", "edp", "svd"], [0.4, 0.6])
    assert [p[0] for p in plan] == ["baseline", "edp_0.4", "edp_0.6", "svd_0.4", "svd_0.6"]
    assert run_name("lrs", 0.45) == "lrs_0.45"
    with pytest.raises(ValueError, match="unknown"):
        plan_runs(["edp", "nope"], [0.4])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        plan_runs(["edp"], [1.5])
    with pytest.raises(ValueError, match="duplicates"):
        plan_runs(["edp", "edp"], [0.4])


def test_report_from_stored_runs(stored_runs):
    runs = collect_runs(stored_runs)
    assert list(runs)[0] == "baseline" and "unfinished_run" not in runs
    assert runs["edp_0.6"].target == 0.6 and runs["baseline"].target is None
    assert [e["epoch"] for e in runs["edp_0.4"].epochs] == [1, 2]
    path = build_report(stored_runs, None, expected=["baseline", "edp_0.4", "admm_lrs_0.4"], bench=False)
    text = path.read_text()
    for name in ("baseline", "edp_0.4", "slimming_0.6", "svd_0.4", "lrs_0.4"):
        assert f"| {name} |" in text
    assert "bb dense" in text and "**Not finished:** admm_lrs_0.4" in text
    assert "abs(gamma) &#124; global" in text          # a '|' in a detail cannot break the table
    for fig in ("fig4_map_vs_flops.png", "fig5_layers_0.4.png", "fig5_layers_0.6.png", "fig3_sparsity.png"):
        assert (stored_runs / fig).stat().st_size > 1000, fig
        assert f"]({fig})" in text
    rows = json.loads((stored_runs / "report_rows.json").read_text())
    edp = next(r for r in rows if r["run"] == "edp_0.4")
    assert edp["r_flops_requested"] == 0.4 and edp["mAP_delta"] == pytest.approx(0.65 - 0.70)
    # figure captions name only the methods that ran at that target (no lrs, which Fig. 5 does not show)
    assert "R_FLOPs 40%, edp vs slimming vs svd (cf. Fig. 5" in text
    # merged layers report their full rank min(c_out, c_in·k·k)
    assert [c["rank"] for c in layer_counts(runs["slimming_0.4"].pm)] == [50, 30]


def test_comparison_rows_read_side_by_side_speedups():
    bench = {"models": {"baseline": {"fps": 10.0}, "edp": {"fps": 15.0}},
             "speedup": {"edp": {"backbone_measured": 1.4, "backbone_ideal": 1.6, "detector_measured": 1.5,
                                 "detector_ideal": 1.2}}}
    rows = comparison_rows({"baseline": {"method": "baseline"}, "edp": {"method": "edp"}}, bench)
    assert rows[1]["fps"] == 15.0 and rows[1]["speedup"] == 1.5 and rows[1]["backbone_ideal_speedup"] == 1.6
    assert "1.40 / 1.60" in format_comparison_table(rows)


def _table_rows(with_speed=True, dense=False):
    metrics = {"baseline": {"method": "baseline", "mAP_voc07": 0.70, "params": 28.3e6, "flops_backbone": 4.1e9,
                            "flops_detector": 31.2e9, "r_flops_backbone": 0.0, "r_flops_detector": 0.0},
               "edp": {"method": "edp", "config": {"compress": {"flops_target": 0.4}}, "mAP_voc07": 0.65,
                       "params": 21.0e6, "flops_backbone": 2.45e9, "flops_detector": 29.5e9,
                       "r_flops_backbone": 0.402, "r_flops_detector": 0.054},
               "slimming_0.6": {"method": "slimming", "config": {"compress": {"flops_target": 0.6}},
                                "mAP_voc07": 0.72, "r_flops_backbone": 0.61}}
    if dense:
        metrics["edp"]["r_flops_backbone_dense"] = 0.1
    bench = None
    if with_speed:
        bench = {"models": {n: {"fps": 10.0 + i, "backbone_fps": 30.0 + i, "peak_memory_mb": 120.0 - i,
                                "model_memory_mb": 100.0 - i} for i, n in enumerate(metrics)},
                 "speedup": {n: {"backbone_measured": 1.4, "backbone_ideal": 1.6, "detector_measured": 1.1,
                                 "detector_ideal": 1.05} for n in ("edp", "slimming_0.6")}}
    rows = comparison_rows(metrics, bench)
    for row in comparison_rows(metrics, bench):   # the demo's second set of rows
        row["run"] += " (inference form)"
        rows.append(row)
    return rows


@pytest.mark.parametrize("with_speed, dense", [(True, False), (True, True), (False, False)])
def test_comparison_table_is_readable(with_speed, dense):
    """Plain-text tables fit 120 columns; the compressed rows are named; Δ mAP is signed (negative = worse); the
    notes say what peak MB measures."""
    text = format_comparison_table(_table_rows(with_speed, dense))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    for title in ("Accuracy", "Size") + (("Speed",) if with_speed else ()):
        assert title in lines
    assert ("Speed" in lines) == with_speed
    row = next(line for line in lines if line.startswith("edp ") and "compressed" in line)
    assert "compressed: edp, 40% FLOPs target" in row and "-0.050" in row    # 0.65 - 0.70: worse, negative
    slim = next(line for line in lines if line.startswith("slimming_0.6 ") and "compressed" in line)
    assert "+0.020" in slim                                                   # better than the baseline: positive
    assert "original (uncompressed)" in next(line for line in lines if line.startswith("baseline "))
    assert "Δ mAP" in text and "negative = less accurate" in text
    for col in ("mAP_voc07", "R_FLOPs bb req/got", "params M", "GFLOPs bb", "GFLOPs det", "weights MB"):
        assert col in text
    assert "40% / 40.2%" in text
    assert ("bb dense" in text) == dense
    if with_speed:
        for col in ("FPS det", "FPS bb", "speedup det meas / ideal", "speedup bb meas / ideal", "peak MB"):
            assert col in text
        assert "peak MB: extra memory" in text and "1.40 / 1.60" in text
    md = format_comparison_table(_table_rows(with_speed, dense), markdown=True)
    assert "| edp | compressed: edp, 40% FLOPs target | 0.650 | -0.050 |" in md


def _tool():
    spec = importlib.util.spec_from_file_location("compare_tool", REPO_ROOT / "tools" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_tool_end_to_end(synthetic_voc, tmp_path, capsys, restore_logging):
    tool = _tool()
    out = tmp_path / "cmp"
    argv = ["--config", str(REPO_ROOT / "configs" / "tiny_synthetic.yaml"), "--methods", "baseline,slimming",
            "--flops-targets", "0.4", "--data-root", str(synthetic_voc), "--output-dir", str(out),
            "train.max_iters_per_epoch=1", "model.min_size=64", "model.max_size=64", "benchmark.enabled=false",
            # lighter heads / schedule than tiny_synthetic's: small checkpoints, seconds per run
            "train.epochs=2", "model.fpn_out_channels=32", "model.representation_size=64"]
    report = tool.main(tool.get_args_parser().parse_args(argv))
    assert report == out / "report.md" and report.exists()
    m = json.loads((out / "slimming_0.4" / "metrics.json").read_text())
    assert m["method"] == "slimming" and 0.40 <= m["r_flops_backbone"] <= 0.41
    base = json.loads((out / "baseline" / "metrics.json").read_text())
    assert base["r_flops_backbone"] == 0.0
    pm = json.loads((out / "slimming_0.4" / "pm_report.json").read_text())
    assert pm["method"] == "slimming" and 0.40 <= pm["achieved_r_flops"] <= 0.41
    text = report.read_text()
    assert "| baseline |" in text and "| slimming_0.4 |" in text and "fig4_map_vs_flops.png" in text
    assert "40% / 40." in capsys.readouterr().out
    # finished runs are skipped; an interrupted one (no metrics.json) resumes from its last checkpoint
    stamp = (out / "baseline" / "metrics.json").stat().st_mtime_ns
    (out / "slimming_0.4" / "metrics.json").unlink()
    tool.main(tool.get_args_parser().parse_args(argv))
    assert (out / "baseline" / "metrics.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "slimming_0.4" / "metrics.json").read_text())
    assert again["mAP_voc07"] == pytest.approx(m["mAP_voc07"]) and "resum" in (out / "log.txt").read_text()
    # --report-only rebuilds from the finished runs without training
    (out / "report.md").unlink()
    tool.main(tool.get_args_parser().parse_args(argv + ["--report-only"]))
    assert (out / "report.md").exists()


def test_method_specific_overrides_reach_only_the_methods_that_declare_them(tmp_path):
    from edp_det.harness.compare import comparison_config
    from edp_det.runtime.errors import ConfigError

    cfg_file = Path(__file__).resolve().parents[1] / "configs" / "tiny_synthetic.yaml"   # an EDP config
    ov = ["compress.slimming_lambda=0.5", "compress.lambda_rank=0.02", "train.epochs=2"]
    slim = comparison_config(cfg_file, "slimming", 0.4, tmp_path, ov)
    edp = comparison_config(cfg_file, "edp", 0.4, tmp_path, ov)
    assert slim["compress"]["slimming_lambda"] == 0.5 and "lambda_rank" not in slim["compress"]
    assert edp["compress"]["lambda_rank"] == 0.02 and "slimming_lambda" not in edp["compress"]
    assert slim["train"]["epochs"] == edp["train"]["epochs"] == 2
    with pytest.raises(ConfigError, match="slimming_lamda"):                  # a typo is still an error
        comparison_config(cfg_file, "slimming", 0.4, tmp_path, ["compress.slimming_lamda=0.5"])


def test_seed_table_summarises_the_measured_backbone_speedup():
    """Over seeds, the backbone speed-up (each run against its seed's baseline) is mean ± std with the ideal one."""
    from edp_det.harness.report import format_seed_table, seed_summary

    rows = [{"seed": s, "method": "edp", "r_flops_requested": 0.4, "mAP_voc07": m, "backbone_speedup": sp,
             "backbone_ideal_speedup": 1 / 0.6} for s, m, sp in ((0, 0.70, 1.2), (1, 0.74, 1.4))]
    table = format_seed_table(seed_summary({"edp_0.4": rows, "baseline": [
        {"seed": 0, "method": "baseline", "mAP_voc07": 0.75}]}))
    head, _, edp, base = table.splitlines()[-4:]
    assert head.split("|")[-2].strip() == "speed-up bb meas / ideal"
    assert edp.split("|")[-2].strip() == "1.30 ± 0.14 / 1.67"   # std of (1.2, 1.4) = 0.1414
    assert base.split("|")[-2].strip() == "-"                    # not timed: no figure
