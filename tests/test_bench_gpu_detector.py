"""benchmarks/bench_gpu_detector.py (docs/BENCHMARKS.md §5), run on the CPU so that the GPU measurement works the
first time a GPU is lent: its JSON holds every field, the FLOPs are the real models' (the EDP model's
backbone cut is the one asked for, and the detector loses exactly what its backbone loses), trained files given
with ``--baseline`` / ``--model`` are the models measured. No timing is asserted beyond being positive."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

import edp_det
from _core_helpers import SAVED_DET_SIZE, one_thread, saved_detector_files  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_gpu_detector", REPO / "benchmarks" / "bench_gpu_detector.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    mp.undo()


def _run(bench, tmp_path, argv):
    out = tmp_path / "gpu.json"
    bench.main(bench.get_args_parser().parse_args(argv + ["--output-json", str(out)]))
    return json.loads(out.read_text())


def _check_rows(rows, batches):
    assert [r["batch"] for r in rows] == batches
    for r in rows:
        for key in ("detector_baseline_fps", "detector_edp_fps", "detector_speedup", "backbone_baseline_fps",
                    "backbone_edp_fps", "backbone_speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)


@pytest.mark.slow
def test_quick_run_measures_the_built_models(bench, tmp_path):
    res = _run(bench, tmp_path, ["--quick"])
    assert (res["device"], res["amp"], res["size"], res["depth"]) == ("cpu", False, 128, 18)
    f_base, f_comp = res["flops_backbone"]
    d_base, d_comp = res["flops_detector"]
    assert 0.40 <= 1 - f_comp / f_base < 0.42
    assert d_base - d_comp == f_base - f_comp          # only the body was compressed
    _check_rows(res["inference"], [1, 2])
    tr = res["training_step"]
    assert tr["ratio"] == pytest.approx(tr["edp_phase_s"] / tr["baseline_s"]) and tr["baseline_s"] > 0


def test_trained_files_are_the_models_measured(bench, tmp_path, tmp_path_factory):
    base, comp = saved_detector_files(tmp_path_factory)
    size = SAVED_DET_SIZE[-1]
    res = _run(bench, tmp_path, ["--device", "cpu", "--baseline", str(base), "--model", str(comp), "--size",
                                 str(size), "--batches", "1", "--rounds", "1", "--iters", "1", "--train-batch", "0"])
    flops = [edp_det.count_flops(edp_det.load_compressed(p), input_size=(3, size, size)) for p in (base, comp)]
    assert res["flops_backbone"] == [f.flops_under("backbone.body") for f in flops]
    assert res["flops_detector"] == [f.flops for f in flops]
    assert res["flops_backbone"][1] < res["flops_backbone"][0]
    _check_rows(res["inference"], [1])
    assert "training_step" not in res
