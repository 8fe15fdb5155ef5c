"""ONNX / TorchScript export of a compressed Faster R-CNN: parity with PyTorch, the fallback contract, the CLI."""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import edp_det
from _core_helpers import SAVED_DET_SIZE, saved_detector_files
from edp_det.harness.cli import cli_main
from _core_helpers import SAVED_DET_ARCH
from edp_det.deploy.export import (example_inputs, export_model, export_onnx, export_torchscript, run_pytorch,
                                   verify_onnx, verify_torchscript)

REPO = Path(__file__).resolve().parents[1]
SIZE = SAVED_DET_SIZE
RTOL, ATOL = 1e-3, 1e-4

ort = pytest.importorskip("onnxruntime")


def _compressed_file(tmp_path_factory) -> Path:
    return saved_detector_files(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def compressed_path(tmp_path_factory):
    return _compressed_file(tmp_path_factory)


@pytest.fixture(scope="module")
def model(compressed_path):
    return edp_det.load_compressed(compressed_path)


def _images():
    return [example_inputs(torch.nn.Linear(1, 1), SIZE, "detector", seed=s) for s in (0, 7)]


def _assert_close(ours, ref, names):
    assert len(ours) == len(ref)
    for name, a, b in zip(names, ours, ref):
        b = b.detach().cpu().numpy()
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


def test_onnx_full_detector_parity(model, tmp_path):
    assert model.backbone.body.layer1[0].conv1.out_channels < 64, "the fixture should be a pruned model"
    res = export_onnx(model, tmp_path / "det.onnx", SIZE)
    assert res.part == "detector" and not res.fell_back, res.errors
    assert res.output_names == ["boxes", "labels", "scores"]
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    n_dets = 0
    for img in _images():
        outs = sess.run(None, {"image": img.numpy()})
        ref = run_pytorch(model, img, "detector")
        _assert_close(outs, ref, res.output_names)
        n_dets += len(outs[0])
    assert n_dets > 0, "parity on zero detections proves nothing"


def test_onnx_fallback_to_backbone_dynamic_parity(model, tmp_path, monkeypatch):
    """If the whole detector cannot be exported, the backbone + FPN is, and the result says so."""
    import edp_det.deploy.export as ex

    def broken(self, image):
        raise RuntimeError("simulated unsupported operator")

    monkeypatch.setattr(ex._DetectorOutputs, "forward", broken)
    res = export_onnx(model, tmp_path / "bb.onnx", SIZE, part="detector", dynamic=True)
    assert res.requested_part == "detector" and res.part == "backbone" and res.fell_back
    assert "simulated unsupported operator" in res.fallback_reason and "NOTE" in res.summary()
    assert res.output_names == ["feat0", "feat1", "feat2", "feat3", "pool"]     # four stages feed the FPN
    with pytest.raises(ex.ExportError, match="simulated"):
        export_onnx(model, tmp_path / "none.onnx", SIZE, part="detector", fallback=False)
    assert not (tmp_path / "none.onnx").exists() and not list(tmp_path.glob(".*.tmp"))
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))   # other batch and size
    outs = sess.run(None, {"images": x.numpy()})
    _assert_close(outs, run_pytorch(model, x, "backbone"), res.output_names)


def test_torchscript_detector_parity(model, tmp_path):
    res = export_torchscript(model, tmp_path / "det.ts.pt", SIZE)
    assert res.part == "detector" and res.method == "torch.jit.script"
    img = _images()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit deprecation, "RCNN always returns a (Losses, Detections) tuple"
        loaded = torch.jit.load(res.path)
        with torch.no_grad(), torch.jit.optimized_execution(False):   # skip the profiling runs: same outputs
            _, dets = loaded([img])
    ref = run_pytorch(model, img, "detector")
    assert len(ref[0]) > 0
    _assert_close([dets[0][k].numpy() for k in ("boxes", "labels", "scores")], ref, ["boxes", "labels", "scores"])


def test_torchscript_backbone_parity(model, tmp_path):
    res = export_model(model, tmp_path / "bb.ts.pt", "torchscript", SIZE, "backbone")
    assert res.part == "backbone"
    check = verify_torchscript(res, model)
    assert check["ok"] and check["num_outputs"] == 5
    assert res.output_names == ["0", "1", "2", "3", "pool"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_backbone_export_names_the_levels_the_fpn_has(tmp_path, fmt):
    """An FPN over three stages (the demo's and the raccoon configs' ``returned_layers: [2, 3, 4]``) has four
    outputs: the export names exactly those and matches PyTorch on them."""
    torch.manual_seed(0)
    m = edp_det.build_model("fasterrcnn", **{**SAVED_DET_ARCH, "returned_layers": [2, 3, 4]}).eval()
    res = export_model(m, tmp_path / f"bb3.{fmt}", fmt, SIZE, "backbone")
    assert res.part == "backbone" and not res.errors, res.errors
    want = ["feat0", "feat1", "feat2", "pool"] if fmt == "onnx" else ["0", "1", "2", "pool"]
    assert res.output_names == want
    check = (verify_onnx if fmt == "onnx" else verify_torchscript)(res, m)
    assert check["ok"] and check["num_outputs"] == 4, check


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="part"):
        export_onnx(model, tmp_path / "x.onnx", SIZE, part="head")
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, tmp_path / "x.onnx", (96, 96))
    with pytest.raises(ValueError, match="format"):
        export_model(model, tmp_path / "x", "tflite", SIZE)
    with pytest.raises(ValueError, match="Faster R-CNN"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "x.onnx", SIZE)
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------------------ CLI
def _load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_cli(compressed_path, tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "cli_bb.onnx"
    res = tool.main(tool.get_args_parser().parse_args(
        ["--model", str(compressed_path), "--format", "onnx", "--part", "backbone", "--output", str(out),
         "--verify"]))
    text = capsys.readouterr().out
    assert out.is_file() and res.part == "backbone"
    assert "backbone + FPN" in text and "verify: OK" in text


def test_export_cli_bad_input_exit_2(tmp_path, capsys):
    tool = _load_tool()
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    for path in (tmp_path / "missing.pt", foreign):
        with pytest.raises(SystemExit) as e:
            cli_main(tool.main, tool.get_args_parser().parse_args(["--model", str(path), "--format", "onnx"]), "export")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path.name) in err


# ------------------------------------------------------------------------------ verification on real images
def _with_score_thresh(model_path, tmp_path, thresh):
    m = edp_det.load_compressed(model_path)
    m.roi_heads.score_thresh = thresh     # 0: every proposal kept (detections on any image); > 1: none
    return edp_det.save_compressed(m, tmp_path / f"thresh{thresh}.pt")


def _png(tmp_path, seed, size=(80, 112)):
    from PIL import Image

    g = np.random.default_rng(seed)
    p = tmp_path / f"img{seed}.png"
    Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
    return p


def test_verify_detections_reports_differences_and_void(compressed_path, tmp_path):
    from edp_det.deploy.export import verify_detections

    m = edp_det.load_compressed(compressed_path)
    m.roi_heads.score_thresh = 0.0
    res = export_onnx(m, tmp_path / "d.onnx", SIZE)            # dynamic by default: any image size
    assert res.dynamic and res.part == "detector"
    images = [torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(1)), torch.rand(3, *SIZE[1:])]
    check = verify_detections(res, m, images)
    assert check["ok"] and not check["void"] and check["resized"] == 0 and check["labels_equal"]
    assert min(check["detections"]) > 0 and 0 <= check["max_box_diff"] < 1e-2 and check["max_score_diff"] < 1e-3
    m.roi_heads.score_thresh = 1.5                              # nothing detected: nothing compared
    check = verify_detections(res, m, images)
    assert check["void"] and not check["ok"] and "void" in check["reason"]


def test_export_cli_verify_on_images_and_void(compressed_path, tmp_path, capsys):
    tool = _load_tool()
    detects = _with_score_thresh(compressed_path, tmp_path, 0.0)
    out = tmp_path / "det.onnx"
    args = ["--model", str(detects), "--format", "onnx", "--output", str(out), "--verify",
            "--verify-images", str(_png(tmp_path, 1)), str(_png(tmp_path, 2, (96, 70)))]
    res = tool.main(tool.get_args_parser().parse_args(args))
    text = capsys.readouterr().out
    assert res.part == "detector" and res.dynamic and "(dynamic H, W)" in text
    assert "verify: OK on 2 image(s) with" in text and "max |box diff|" in text and "max |score diff|" in text, text

    blind = _with_score_thresh(compressed_path, tmp_path, 1.5)
    with pytest.raises(SystemExit) as e:
        tool.main(tool.get_args_parser().parse_args(["--model", str(blind), "--format", "onnx", "--output",
                                                     str(tmp_path / "blind.onnx"), "--verify"]))
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "random image" in text and "VOID" in text and "verify: OK" not in text, text


def test_static_onnx_export_says_it_rejects_other_sizes(compressed_path, tmp_path, capsys):
    tool = _load_tool()
    detects = _with_score_thresh(compressed_path, tmp_path, 0.0)
    res = tool.main(tool.get_args_parser().parse_args(
        ["--model", str(detects), "--format", "onnx", "--static", "--output", str(tmp_path / "s.onnx"), "--verify",
         "--verify-images", str(_png(tmp_path, 3))]))
    text = capsys.readouterr().out
    assert not res.dynamic and "rejects other image sizes" in text
    assert "resized to the static export size 96x96" in text and "verify: OK" in text, text
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension"):
        sess.run(None, {"image": np.zeros((3, 80, 112), np.float32)})


def test_export_cli_verify_on_voc_data_root(compressed_path, tmp_path, capsys):
    from edp_det.data.synthetic import make_synthetic_voc

    tool = _load_tool()
    make_synthetic_voc(tmp_path / "voc", num_train=1, num_test=3, image_size=72, seed=0)
    detects = _with_score_thresh(compressed_path, tmp_path, 0.0)
    tool.main(tool.get_args_parser().parse_args(
        ["--model", str(detects), "--format", "torchscript", "--output", str(tmp_path / "d.torchscript.pt"),
         "--verify", "--data-root", str(tmp_path / "voc"), "--verify-count", "2"]))
    text = capsys.readouterr().out
    assert "verify: OK on 2 image(s) with" in text and "labels identical" in text, text


# ------------------------------------------------------------------------------ refusals before any export
def _export_exit(tool, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(tool.main, tool.get_args_parser().parse_args(argv), "export")
    err = capsys.readouterr().err
    assert err.startswith("export: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return e.value.code, err


def test_export_cli_protects_its_input_and_existing_files(compressed_path, tmp_path, capsys):
    """--output that is the --model file is refused even with --overwrite, an existing file without --overwrite, a
    folder always (nothing written, no temp file left); --overwrite replaces a file; a TorchScript archive given as
    --model is named as such."""
    tool = _load_tool()
    before = compressed_path.read_bytes()
    alias = compressed_path.parent / "." / compressed_path.name
    for flags in ([], ["--overwrite"]):
        code, err = _export_exit(tool, ["--model", str(compressed_path), "--format", "torchscript", "--output",
                                        str(alias), *flags], capsys)
        assert code == 2 and "--output" in err and "--model file itself" in err
    assert compressed_path.read_bytes() == before
    old = tmp_path / "bb.pt"
    old.write_bytes(b"old")
    argv = ["--model", str(compressed_path), "--format", "torchscript", "--part", "backbone", "--output", str(old)]
    code, err = _export_exit(tool, argv, capsys)
    assert code == 2 and str(old) in err and "--overwrite" in err and old.read_bytes() == b"old"
    folder = tmp_path / "folder"
    folder.mkdir()
    code, err = _export_exit(tool, argv[:-1] + [str(folder)], capsys)
    assert code == 2 and str(folder) in err and "directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb.pt", "folder"] and not list(folder.iterdir())
    res = tool.main(tool.get_args_parser().parse_args(argv + ["--overwrite"]))
    assert res.part == "backbone" and old.read_bytes() != b"old"
    code, err = _export_exit(tool, ["--model", str(old), "--format", "onnx", "--output", str(tmp_path / "x.onnx")],
                             capsys)
    assert code == 2 and str(old) in err and "TorchScript archive" in err and "not an edp-det model file" in err


def test_export_library_refuses_a_folder(model, tmp_path):
    with pytest.raises(ValueError, match="directory"):
        export_onnx(model, tmp_path, SIZE, part="backbone")
    with pytest.raises(ValueError, match="directory"):
        export_torchscript(model, tmp_path, SIZE, part="backbone")
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}*"))


@pytest.mark.parametrize("argv, needles", [
    (["--format", "torchscript", "--opset", "17"], ["--opset", "ONNX options", "--format torchscript"]),
    (["--format", "torchscript", "--static"], ["--static", "ONNX options"]),
    (["--format", "onnx", "--opset", "99"], ["--opset 99", "opsets 11 to"]),
    (["--format", "onnx", "--opset", "10"], ["--opset 10", ">= 11"]),
    (["--format", "onnx", "--verify-count", "2"], ["--verify-count", "only used with --verify"]),
    (["--format", "onnx", "--data-root", "voc"], ["--data-root", "only used with --verify"]),
    (["--format", "onnx", "--verify-images", "a.png"], ["--verify-images", "only used with --verify"]),
    (["--format", "onnx", "--verify", "--split", "val"], ["--split", "only used with --data-root"]),
])
def test_export_cli_refuses_options_that_do_nothing(compressed_path, tmp_path, capsys, argv, needles):
    tool = _load_tool()
    code, err = _export_exit(tool, ["--model", str(compressed_path), "--output", str(tmp_path / "o"), *argv], capsys)
    assert code == 2
    for n in needles:
        assert n in err, err
    assert not list(tmp_path.iterdir())


def test_export_ctrl_c_leaves_no_partial_file(compressed_path, tmp_path, capsys, monkeypatch, restore_logging):
    """Ctrl-C while the file is being written (the tool run as a script): exit 130, one line that does not speak of
    checkpoints, and neither the output nor a temporary file is left."""
    import runpy
    import sys

    def interrupted_save(module, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.jit, "save", interrupted_save)
    monkeypatch.setattr(sys, "argv", ["export.py", "--model", str(compressed_path), "--format", "torchscript",
                                      "--part", "backbone", "--output", str(tmp_path / "bb.pt"), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "tools" / "export.py"), run_name="__main__")
    assert e.value.code == 130
    assert capsys.readouterr().err == "export: interrupted; no partially written file was left\n"
    assert not list(tmp_path.iterdir())
