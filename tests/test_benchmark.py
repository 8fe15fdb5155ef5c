"""edp_det.deploy.benchmark and tools/benchmark.py: fields and FLOPs bookkeeping (no timing thresholds), the CLI."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import edp_det
from _core_helpers import SAVED_DET_SIZE, saved_detector_files
from edp_det.harness.cli import cli_main
from edp_det.deploy.benchmark import (benchmark_detector, compare_side_by_side, default_input_size, format_comparison,
                               measure_latency)

REPO = Path(__file__).resolve().parents[1]
SIZE = SAVED_DET_SIZE


def _model_files(tmp_path_factory) -> tuple[Path, Path]:
    return saved_detector_files(tmp_path_factory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _model_files(tmp_path_factory)


@pytest.fixture(scope="module")
def models(files):
    return {"baseline": edp_det.load_compressed(files[0]), "edp": edp_det.load_compressed(files[1])}


def test_measure_latency_counts_calls():
    calls = []
    r = measure_latency(lambda: calls.append(1), warmup=2, iters=3, device="cpu")
    assert len(calls) == 5
    assert set(r) >= {"median_ms", "mean_ms", "p90_ms", "fps"} and len(r["samples_ms"]) == 3
    assert 0 <= r["median_ms"] <= r["p90_ms"] and r["fps"] > 0
    with pytest.raises(ValueError):
        measure_latency(lambda: None, iters=0)


def test_benchmark_detector_fields(models, files):
    m = models["edp"]
    m.train()
    r = benchmark_detector(m, SIZE, device="cpu", warmup=0, iters=2, model_path=files[1])
    assert m.training, "train/eval mode must be restored"
    flops = edp_det.count_flops(m, input_size=SIZE)
    assert r["fps"] > 0 and r["backbone_fps"] > 0
    assert r["latency_ms"] > 0 and r["backbone_latency_ms"] > 0
    assert r["params"] == flops.params == sum(p.numel() for p in m.parameters())
    assert r["flops_backbone"] == flops.parts["backbone.body"]["flops"]
    assert r["flops_detector"] == sum(d["flops"] for d in flops.parts.values())
    assert r["flops_backbone"] < r["flops_detector"]
    assert r["device"] == "cpu" and r["input_size"] == list(SIZE) and r["network_size"] == [96, 96]
    assert r["peak_memory_mb"] is not None and r["peak_memory_mb"] >= 0
    assert r["memory"]["method"].startswith("cpu-subprocess")
    assert r["model_memory_mb"] > 0
    assert default_input_size(m) == SIZE


def test_benchmark_detector_rejects_classifier():
    with pytest.raises(ValueError, match="Faster R-CNN"):
        benchmark_detector(torch.nn.Conv2d(3, 3, 1), SIZE, peak_memory=False)


def test_compare_side_by_side(models):
    r = compare_side_by_side(models, SIZE, device="cpu", rounds=2, iters_per_round=1, warmup=0)
    assert r["baseline"] == "baseline" and list(r["models"]) == ["baseline", "edp"]
    for name, m in r["models"].items():
        assert m["fps"] > 0 and m["backbone_fps"] > 0 and len(m["latency_round_medians_ms"]) == 2
    sp = r["speedup"]
    assert sp["baseline"]["backbone_ideal"] == pytest.approx(1.0)
    assert sp["edp"]["backbone_ideal"] > 1.5   # 40 % of the backbone FLOPs removed -> ideal 1/(1-0.4)
    assert sp["edp"]["detector_ideal"] > 1.0
    base, edp = r["models"]["baseline"], r["models"]["edp"]
    assert sp["edp"]["backbone_ideal"] == pytest.approx(base["flops_backbone"] / edp["flops_backbone"])
    assert sp["edp"]["detector_measured"] == pytest.approx(base["latency_ms"] / edp["latency_ms"])
    assert sp["edp"]["backbone_ratio"] == pytest.approx(sp["edp"]["backbone_measured"] / sp["edp"]["backbone_ideal"])
    table = format_comparison(r)
    assert "baseline" in table and "edp" in table and "ideal" in table


def test_compare_side_by_side_inference_form(models):
    """optimize=True times folded copies; the given models keep their norm layers; FLOPs/ideal stay the PM ones."""
    n_norm = {k: sum(isinstance(m, torch.nn.BatchNorm2d) for m in v.modules()) for k, v in models.items()}
    plain = compare_side_by_side(models, SIZE, device="cpu", rounds=1, iters_per_round=1, warmup=0)
    r = compare_side_by_side(models, SIZE, device="cpu", rounds=1, iters_per_round=1, warmup=0, optimize=True)
    for k, v in models.items():
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in v.modules()) == n_norm[k] > 0
        form = r["models"][k]["inference_form"]
        assert 0 < form["folded"] <= n_norm[k]   # the body's norm layers folded into its convs
        assert form["max_rel_err"] < 1e-3
        assert r["models"][k]["flops_backbone"] == plain["models"][k]["flops_backbone"]
    assert r["speedup"]["edp"]["backbone_ideal"] == pytest.approx(plain["speedup"]["edp"]["backbone_ideal"])
    assert "inference_form" not in plain["models"]["edp"]


# ------------------------------------------------------------------------------------------------ CLI
def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", REPO / "tools" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_cli_runs(files, tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "bench.json"
    tool.main(tool.get_args_parser().parse_args(
        ["--model", str(files[1]), "--iters", "1", "--rounds", "1", "--warmup", "0", "--no-memory", "--optimize",
         "--output-json", str(out)]))
    text = capsys.readouterr().out
    assert "detector" in text and "GFLOPs" in text
    data = json.loads(out.read_text())
    assert data["models"]["model"]["fps"] > 0 and data["input_size"] == [3, 96, 96]
    assert data["models"]["model"]["inference_form"]["folded"] > 0


def test_benchmark_cli_bad_input_exit_2(tmp_path, capsys):
    """Missing file and a torch file that is not an edp-det model: one line on stderr, exit status 2 (in-process:
    ``__main__`` only calls ``main``; a subprocess would spend seconds importing torchvision)."""
    tool = _load_tool()
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    for path, msg in ((tmp_path / "missing.pt", "file not found"), (foreign, "not an edp-det compressed model")):
        with pytest.raises(SystemExit) as e:
            cli_main(tool.main, tool.get_args_parser().parse_args(["--model", str(path), "--baseline", str(path)]), "benchmark")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and path.name in err


def _bench_exit_2(tool, argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        cli_main(tool.main, tool.get_args_parser().parse_args(argv), "benchmark")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_benchmark_output_json_never_replaces_a_run_or_input_and_needs_overwrite(files, tmp_path, capsys):
    """--output-json: a training run's metrics.json and the --model file are refused even with --overwrite; any
    other existing file needs --overwrite, which then replaces it."""
    tool = _load_tool()
    run = tmp_path / "run"
    run.mkdir()
    for name, text in (("config.yaml", "method: edp\n"), ("metrics_log.jsonl", "{}\n"), ("metrics.json", '{"a": 1}')):
        (run / name).write_text(text)
    fast = ["--model", str(files[1]), "--iters", "1", "--rounds", "1", "--warmup", "0", "--no-memory"]
    for flags in ([], ["--overwrite"]):
        _bench_exit_2(tool, fast + ["--output-json", str(run / "metrics.json"), *flags], capsys,
                      str(run / "metrics.json"), "training run")
        _bench_exit_2(tool, fast + ["--output-json", str(files[1]), *flags], capsys, "--model file itself")
    assert (run / "metrics.json").read_text() == '{"a": 1}'
    out = tmp_path / "bench.json"
    out.write_text("old")
    _bench_exit_2(tool, fast + ["--output-json", str(out)], capsys, str(out), "--overwrite")
    assert out.read_text() == "old"
    tool.main(tool.get_args_parser().parse_args(fast + ["--output-json", str(out), "--overwrite"]))
    assert json.loads(out.read_text())["models"]["model"]["fps"] > 0


def test_benchmark_cli_refuses_a_classifier_and_a_torchscript_archive(tmp_path, capsys):
    import warnings

    tool = _load_tool()
    cls = edp_det.save_compressed(edp_det.build_model("resnet18", num_classes=3), tmp_path / "cls.pt")
    ts = tmp_path / "m.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit deprecation
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ts))
    _bench_exit_2(tool, ["--model", str(cls)], capsys, str(cls), "'resnet18' model, not a detector")
    _bench_exit_2(tool, ["--model", str(ts)], capsys, str(ts), "TorchScript archive")
