"""A run's output folder: never mix or lose runs, clean up after kills, resume without duplicated records,
progress lines in log files, start banner, TensorBoard scalars."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from edp_det.runtime.checkpoint import load_checkpoint
from edp_det.runtime.errors import ConfigError
from edp_det.harness.run_config import resolve_config
from edp_det.runtime.logs import ProgressMeter, format_duration
from edp_det.runtime.rundir import RunDirError, check_run_dir, start_run_dir, truncate_metrics_log
from edp_det.train.detection import DetectionTask
from edp_det.train.engine import Trainer

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "tiny_synthetic.yaml"
FAST = ["model.min_size=64", "model.max_size=64", "train.max_iters_per_epoch=2", "benchmark.enabled=false",
        "train.checkpoint_keep=5"]


def _trainer(root, out, *overrides, resume=None, overwrite=False):
    cfg = resolve_config(TINY, [*FAST, f"data.root={root}", *overrides], task="detection", output_dir=out)
    return Trainer(cfg, DetectionTask(cfg), out, resume=resume, overwrite=overwrite)


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "log.txt"}


def _records(out):
    return [json.loads(line) for line in (out / "metrics_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(synthetic_voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    _trainer(synthetic_voc, out).run()
    return out


def _tool(*args, timeout=240):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train_det.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_new_run_into_a_finished_run_is_refused_and_changes_nothing(finished, synthetic_voc):
    before = _snapshot(finished)
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        _trainer(synthetic_voc, finished).run()
    assert _snapshot(finished) == before
    r = _tool("--config", TINY, "--data-root", synthetic_voc, "--output-dir", finished, *FAST)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(finished) == before


def test_failed_start_up_leaves_the_folder_alone(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    # even with --overwrite: the data check fails before anything of the earlier run is cleared
    r = _tool("--config", TINY, "--data-root", tmp_path / "missing", "--output-dir", run, "--overwrite", *FAST)
    assert r.returncode == 2 and "missing" in r.stderr
    assert _snapshot(run) == before
    # ... and so does a value that only the data loader or the final benchmark would have used
    for bad in ("seed=-1", "benchmark.device=tpu"):
        r = _tool("--config", TINY, "--data-root", tmp_path / "missing", "--output-dir", run, "--overwrite", *FAST,
                  bad, "benchmark.enabled=true")
        assert r.returncode == 2 and bad.split("=")[0] in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert _snapshot(run) == before


def test_overwrite_clears_the_earlier_run(finished, synthetic_voc, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("mine")
    _trainer(synthetic_voc, run, "train.epochs=2", "compress.epoch_es=1", overwrite=True).run()
    ends = [r for r in _records(run) if r.get("phase") == "end_epoch"]
    assert [r["epoch"] for r in ends] == [1, 2]                  # one run's records only
    assert not (run / "checkpoint_epoch0003.pt").exists()        # the earlier run's checkpoint is gone
    assert (run / "notes.txt").read_text() == "mine"             # files that are not the run's stay


def test_output_dir_that_is_a_file(tmp_path, synthetic_voc):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        check_run_dir(f)
    r = _tool("--config", TINY, "--data-root", synthetic_voc, "--output-dir", f, *FAST)
    assert r.returncode == 2 and "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_resume_after_a_kill(finished, synthetic_voc, tmp_path):
    """Killed in epoch 3: a stale temporary, partial epoch-3 records; the resumed run cleans both up and its
    train_time_s counts the epochs before the kill too."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in ("checkpoint_epoch0003.pt", "model_final.pt", "metrics.json"):
        (run / name).unlink()
    (run / "last_checkpoint").write_text("checkpoint_epoch0002.pt\n")
    partial = [r for r in _records(finished) if r.get("epoch") == 3 and r.get("phase") != "end_epoch"]
    with open(run / "metrics_log.jsonl", "w") as f:
        for r in _records(finished):
            if r.get("epoch", 0) <= 2:
                f.write(json.dumps(r) + "\n")
        for r in partial:
            f.write(json.dumps(r) + "\n")
        f.write('{"epoch": 3, "iter"')                           # a line cut by the kill
    tmp = run / ".checkpoint_epoch0003.pt.4242.deadbeef.tmp"
    tmp.write_bytes(b"\0" * 1024)
    metrics = _trainer(synthetic_voc, run, "train.log_interval=1", resume="auto").run()   # how it logs may change
    assert not tmp.exists()
    recs = _records(run)
    steps = [(r["epoch"], r["iter"]) for r in recs if "iter" in r]
    assert len(steps) == len(set(steps))                         # no step logged twice
    assert [r["epoch"] for r in recs if r.get("phase") == "end_epoch"] == [1, 2, 3]
    assert [r["epoch"] for r in recs if r.get("phase") == "resume"] == [3]
    before_kill = load_checkpoint(run / "checkpoint_epoch0002.pt")["train_time_s"]
    assert before_kill > 0 and metrics["train_time_s"] > before_kill


def test_resume_refuses_other_settings_and_a_finished_run(finished, synthetic_voc, tmp_path):
    """A resumed run continues the saved one: a command that changes what it trains (seed, lr, method, target) is
    refused naming the keys, and a finished run has nothing to resume; neither touches the folder."""
    with pytest.raises(RunDirError, match="is finished"):
        _trainer(synthetic_voc, finished, resume="auto").run()
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in ("checkpoint_epoch0003.pt", "model_final.pt", "metrics.json"):
        (run / name).unlink()
    (run / "last_checkpoint").write_text("checkpoint_epoch0002.pt\n")
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"compress\.flops_target: 0\.4 in the checkpoint, 0\.6 now; seed: 0 in the "
                                          r"checkpoint, 3 now; train\.lr: .* now \(and 1 more\)"):
        _trainer(synthetic_voc, run, "seed=3", "train.lr=0.5", "compress.flops_target=0.6", "train.momentum=0.5",
                 resume="auto").run()
    assert _snapshot(run) == before
    r = _tool("--config", TINY, "--data-root", synthetic_voc, "--output-dir", run, "--resume", *FAST, "method=baseline")
    assert r.returncode == 2 and "method: 'edp' in the checkpoint, 'baseline' now" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and _snapshot(run) == before


def test_resume_refuses_other_classes_and_another_process_count(synthetic_voc, tmp_path):
    """Data with the same config but other class names (or order), or another number of processes (another global
    batch), would continue another training: refused naming both sides."""
    from types import SimpleNamespace

    trainer = _trainer(synthetic_voc, tmp_path / "run")
    trainer.task = SimpleNamespace(classes=["circle", "square", "triangle"])
    trainer.dist = SimpleNamespace(world_size=1)
    ckpt = {"config": trainer.cfg, "epoch": 0, "classes": ["circle", "square", "triangle"], "world_size": 1}
    trainer._check_resumable(ckpt, "ck.pt")
    trainer._check_resumable({**ckpt, "world_size": None, "classes": None}, "ck.pt")   # older checkpoints
    with pytest.raises(ConfigError, match="classes circle,triangle,square .* now gives circle,square,triangle"):
        trainer._check_resumable({**ckpt, "classes": ["circle", "triangle", "square"]}, "ck.pt")
    with pytest.raises(ConfigError, match="trained on 4 process\\(es\\), this one has 1"):
        trainer._check_resumable({**ckpt, "world_size": 4}, "ck.pt")


def test_truncate_metrics_log(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"epoch": 1}\n{"phase": "x"}\n{"epoch": 2, "iter": 1}\n[1]\n{"epoch": 3}\n{"epo')
    assert truncate_metrics_log(p, 1) == 4
    assert [json.loads(x) for x in p.read_text().splitlines()] == [{"epoch": 1}, {"phase": "x"}]
    assert truncate_metrics_log(tmp_path / "none.jsonl", 1) == 0


def test_start_run_dir_refuses_resume_with_overwrite(tmp_path):
    with pytest.raises(RunDirError, match="exclude"):
        start_run_dir(tmp_path, resume=True, overwrite=True)


def test_progress_lines_banner_and_tensorboard(synthetic_voc, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    r = _tool("--config", TINY, "--data-root", synthetic_voc, "--output-dir", out, *FAST, "train.epochs=2",
              "compress.epoch_es=1", "train.tensorboard=true")
    assert r.returncode == 0, r.stderr
    log = (out / "log.txt").read_text()
    for text in (r.stdout, log):                                 # stdout is a pipe here, not a terminal
        assert "epoch 2/2  iter 2/2  loss " in text and " s/it  eta " in text and "(run " in text
        assert "data: train (trainval) 12, test (test) 6" in text and "method edp" in text
        assert "FLOPs target 40%" in text and f"output: {out}" in text
    assert "\r" not in log
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/lr" in tags and "final/mAP_voc07" in tags
    assert len(acc.Scalars("train/loss")) == 4                   # 2 epochs x 2 iterations, log_interval 1


def test_progress_meter_eta_with_a_fake_clock():
    now = [100.0]
    meter = ProgressMeter(10, remaining_after=20, clock=lambda: now[0])
    for i in range(4):
        now[0] += 0.5
        meter.update(1.0 + i, {"loss_a": 0.5})
    line = meter.line(2, 3, 4, 0.01)
    # 0.5 s/it; 6 iterations left in the epoch (3 s), 26 in the run (13 s)
    assert line == ("epoch 2/3  iter 4/10  loss 4.0000 (2.5000)  loss_a 0.5000 (0.5000)  lr 1.00e-02  0.500 s/it  "
                    "eta 0:00:03 (run 0:00:13)")
    assert format_duration(90061) == "1 day, 1:01:01" and format_duration(float("nan")) == "?"
