"""tools/demo.py end to end at a tiny size: the trained-start protocol (baseline, then EDP and an uncompressed
control from its weights), the report and the printed summary; a folder of the earlier from-scratch demo is
refused with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num-train", "4", "--num-test", "2", "--image-size", "96", "train.epochs=1", "train.max_iters_per_epoch=1",
        "compress.schedule.epochs=2", "compress.schedule.epoch_es=1", "benchmark.enabled=false", "eval.coco=false"]


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--output-dir", str(out), *TINY, *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_demo_compresses_the_trained_baseline_next_to_an_uncompressed_control(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("baseline", "control", "edp"):
        assert (out / name / "metrics.json").exists(), name
    baseline_weights = str(out / "baseline" / "model_final.pt")
    for name, method in (("edp", "edp"), ("control", "baseline")):
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert cfg["method"] == method
        assert cfg["compress"]["schedule"]["enabled"] is True
        assert os.path.samefile(cfg["model"]["weights"], baseline_weights), (name, cfg["model"]["weights"])
    base_cfg = yaml.safe_load((out / "baseline" / "config.yaml").read_text())
    assert base_cfg["model"]["weights"] in (None, "") and base_cfg["compress"]["schedule"]["enabled"] is False
    edp = json.loads((out / "edp" / "metrics.json").read_text())
    assert edp["r_flops_backbone"] >= 0.4
    report = (out / "demo_report.md").read_text()
    assert all(f"| {n} " in report for n in ("baseline", "control", "edp"))
    assert "EDP - control" in r.stdout and "backbone FLOPs at PM (target 40%)" in r.stdout
    assert json.loads((out / "grid.json").read_text())["start"] == "trained"


def test_demo_refuses_a_folder_of_the_from_scratch_demo(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "grid.json").write_text(json.dumps({"start": "scratch"}))
    r = _demo(out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "--output-dir" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["grid.json"]


def test_a_compression_run_that_fails_ends_the_demo_with_one_line_and_exit_1(tmp_path):
    """A learning rate no run survives (the compression schedule's only: the baseline still trains) makes the control
    and EDP runs fail on a non-finite loss; the demo names both and their logs instead of reporting a partial
    comparison."""
    out = tmp_path / "demo"
    r = _demo(out, "compress.schedule.lr=1e9")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: failed: 2 run(s) of the demo did not finish"), r.stderr
    assert "non-finite loss" in lines[0]
    for name in ("control", "edp"):
        assert str(out / name / "log.txt") in lines[0]
        assert not (out / name / "metrics.json").exists()
    assert (out / "baseline" / "metrics.json").exists()
    assert not (out / "demo_report.md").exists()
