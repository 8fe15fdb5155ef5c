"""tools/eval_det.py end to end on a tiny hand-written VOC split (detections mode, model mode with a fake model)."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("eval_det_tool", REPO / "tools" / "eval_det.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


eval_det = _load_tool()

# image id -> (width, height, [(name, [xmin, ymin, xmax, ymax] VOC 1-based, difficult)])
IMAGES = {
    "img1": (64, 48, [("cat", [5, 5, 30, 30], 0), ("dog", [35, 10, 60, 40], 0)]),
    "img2": (60, 50, [("cat", [10, 10, 40, 40], 1), ("dog", [2, 2, 20, 20], 0)]),
    "img3": (40, 40, []),
}


def _write_voc(root: Path) -> Path:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for img_id, (w, h, objs) in IMAGES.items():
        Image.new("RGB", (w, h), (120, 80, 40)).save(root / "JPEGImages" / f"{img_id}.jpg")
        parts = [f"<annotation><filename>{img_id}.jpg</filename>",
                 f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
        for name, (x1, y1, x2, y2), diff in objs:
            parts.append(f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{x1}</xmin>"
                         f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        parts.append("</annotation>")
        (root / "Annotations" / f"{img_id}.xml").write_text("".join(parts))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(IMAGES) + "\n")
    return root


@pytest.fixture
def voc_root(tmp_path):
    return _write_voc(tmp_path / "voc")


def D(img, cat, bbox, score):
    return {"image_id": img, "category": cat, "bbox": bbox, "score": score}


def _args(**kw):
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return eval_det.get_args_parser().parse_args(argv)


def test_detections_mode_end_to_end(voc_root, tmp_path, capsys):
    # cat: npos = 1 (the img2 cat is difficult). Sorted: img3 FP (0.95), img1 TP (0.9), img2 difficult hit (ignored).
    #      curve (r 0, p 0), (r 1, p 1/2) -> AP07 = AP_area = 0.5.  COCO: precision 1/2 at every recall -> 0.5.
    # dog: both found exactly -> 1.0.  mAP = 0.75 for all four metrics.
    dets = [
        D("img3", "cat", [5, 5, 30, 30], 0.95),
        D("img1", "cat", [5, 5, 30, 30], 0.9),
        D("img2", "cat", [10, 10, 40, 40], 0.8),
        D("img1", "dog", [35, 10, 60, 40], 0.7),
        D("img2", "dog", [2, 2, 20, 20], 0.6),
    ]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "detections.json").write_text(json.dumps(dets))
    m = eval_det.main(_args(detections=run_dir / "detections.json", data_root=voc_root, split="test"))
    on_disk = json.loads((run_dir / "eval_test" / "metrics.json").read_text())  # default: eval_<split>/ beside input
    assert not (run_dir / "metrics.json").exists()
    assert on_disk == m
    assert m["mAP_voc07"] == pytest.approx(0.75) and m["mAP_area"] == pytest.approx(0.75)
    assert m["coco_ap50"] == pytest.approx(0.75) and m["coco_ap"] == pytest.approx(0.75)
    assert m["ap_per_class"]["cat"] == {"ap_voc07": pytest.approx(0.5), "ap_area": pytest.approx(0.5),
                                        "num_gt": 1, "num_difficult": 1, "num_det": 3}
    assert m["ap_per_class"]["dog"]["ap_voc07"] == pytest.approx(1.0)
    assert m["split"] == "test" and m["num_images"] == 3 and m["iou_thresh"] == 0.5
    out = capsys.readouterr().out
    assert "cat" in out and "dog" in out and "0.7500" in out

    # --output-dir, --iou-thresh, --classes (order given by the user)
    out_dir = tmp_path / "elsewhere"
    m = eval_det.main(_args(detections=run_dir / "detections.json", data_root=voc_root, output_dir=out_dir,
                            iou_thresh=0.7, classes="dog,cat"))
    assert (out_dir / "metrics.json").is_file() and m["iou_thresh"] == 0.7
    assert list(m["ap_per_class"]) == ["dog", "cat"]


def _expect_exit2(capsys, args, *needles):
    from edp_det.harness.cli import cli_main

    with pytest.raises(SystemExit) as ei:
        cli_main(eval_det.main, args, "eval_det")
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("eval_det: error:")
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "content, needles",
    [
        ([D("img1", "zebra", [1, 1, 5, 5], 0.5)], ["detections[0].category", "'zebra'"]),
        ([D("img1", "cat", [1, 1, 5, 5], 0.5), D("nope", "cat", [1, 1, 5, 5], 0.5)],
         ["detections[1].image_id", "'nope'", "split 'test'"]),
        ([{"image_id": "img1", "category": "cat", "bbox": [1, 1, 5, 5]}], ["detections[0]", "missing key 'score'"]),
        ([D("img1", "cat", [1, 1, 5], 0.5)], ["detections[0].bbox", "[1, 1, 5]"]),
        ("{not json", ["invalid JSON"]),
        ({"detections": []}, ["expected a JSON list"]),
    ],
)
def test_bad_detections_exit_2(voc_root, tmp_path, capsys, content, needles):
    p = tmp_path / "dets.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    _expect_exit2(capsys, _args(detections=p, data_root=voc_root), str(p), *needles)
    assert not (tmp_path / "metrics.json").exists()


def test_missing_inputs_exit_2(voc_root, tmp_path, capsys):
    _expect_exit2(capsys, _args(detections=tmp_path / "missing.json", data_root=voc_root), "missing.json", "not found")
    p = tmp_path / "dets.json"
    p.write_text("[]")
    _expect_exit2(capsys, _args(detections=p, data_root=tmp_path / "novoc"), "novoc")
    _expect_exit2(capsys, _args(detections=p, data_root=voc_root, split="val"), "val")
    _expect_exit2(capsys, _args(detections=p, data_root=voc_root, iou_thresh=1.5), "--iou-thresh")


def test_cli_subprocess_exit_code(voc_root, tmp_path):
    p = tmp_path / "dets.json"
    p.write_text(json.dumps([D("img1", "zebra", [1, 1, 5, 5], 0.5)]))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "eval_det.py"), "--detections", str(p), "--data-root",
                        str(voc_root)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "'zebra'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


class FakeDetector(torch.nn.Module):
    """Returns the ground truth of the image it recognises by size (continuous xyxy), labels for classes cat, dog.
    Has the parts that make a model a detector (``edp_det.ops.adapter.is_detector``), unused."""

    classes = ["cat", "dog"]
    transform = backbone = rpn = roi_heads = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = {}
        for img_id, (w, h, objs) in IMAGES.items():
            keep = [(n, b) for n, b, d in objs if not d]
            self.table[(h, w)] = (
                torch.tensor([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b in keep], dtype=torch.float32).reshape(-1, 4),
                torch.tensor([self.classes.index(n) + 1 for n, _ in keep], dtype=torch.int64),
            )

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        outs = []
        for img in images:
            boxes, labels = self.table[tuple(img.shape[-2:])]
            outs.append({"boxes": boxes, "labels": labels, "scores": torch.full((len(labels),), 0.9)})
        return outs


def test_model_mode_with_fake_model(voc_root, tmp_path, monkeypatch, capsys):
    import edp_det

    model_path = tmp_path / "run" / "model_final.pt"
    model_path.parent.mkdir()
    model_path.write_bytes(b"placeholder")
    monkeypatch.setattr(edp_det, "load_compressed", lambda path: FakeDetector(), raising=False)
    m = eval_det.main(_args(model=model_path, data_root=voc_root))
    assert m["mAP_voc07"] == pytest.approx(1.0) and m["coco_ap"] == pytest.approx(1.0)
    dets = json.loads((model_path.parent / "eval_test" / "detections.json").read_text())
    got = sorted((d["image_id"], d["category"], d["bbox"]) for d in dets)
    want = sorted((i, n, [float(v) for v in b]) for i, (_, _, objs) in IMAGES.items() for n, b, d in objs if not d)
    assert got == want  # continuous xyxy converted back to VOC 1-based boxes exactly
    assert json.loads((model_path.parent / "eval_test" / "metrics.json").read_text())["num_images"] == 3


def test_evaluation_never_overwrites_a_training_run(voc_root, tmp_path, monkeypatch, capsys):
    """``--model RUN/model_final.pt`` without --output-dir leaves the run's own metrics.json / detections.json
    untouched and writes RUN/eval_<split>/; an --output-dir holding a training run, or naming a file, is refused."""
    import edp_det

    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pt").write_bytes(b"placeholder")
    (run / "config.yaml").write_text("method: edp\n")
    training = {"mAP_voc07": 0.5, "params": 123, "flops_backbone": 456, "r_flops_backbone": 0.4, "fps": 7.0}
    (run / "metrics.json").write_text(json.dumps(training))
    (run / "detections.json").write_text("[]")
    monkeypatch.setattr(edp_det, "load_compressed", lambda path: FakeDetector(), raising=False)
    m = eval_det.main(_args(model=run / "model_final.pt", data_root=voc_root, split="test", device="cpu"))
    assert json.loads((run / "metrics.json").read_text()) == training
    assert (run / "detections.json").read_text() == "[]"
    assert json.loads((run / "eval_test" / "metrics.json").read_text()) == m and m["mAP_voc07"] == pytest.approx(1.0)
    assert json.loads((run / "eval_test" / "detections.json").read_text())
    _expect_exit2(capsys, _args(model=run / "model_final.pt", data_root=voc_root, output_dir=run),
                  "--output-dir", "training run", "config.yaml")
    assert json.loads((run / "metrics.json").read_text()) == training
    _expect_exit2(capsys, _args(model=run / "model_final.pt", data_root=voc_root, output_dir=run / "config.yaml"),
                  "--output-dir", "not a directory")


@pytest.mark.slow
def test_model_mode_real_serialization(synthetic_voc, tmp_path, capsys):
    """Full --model path: a (random-weight) torchvision Faster R-CNN saved with save_compressed, reloaded by the tool."""
    edp_det = pytest.importorskip("edp_det")
    if not (hasattr(edp_det, "load_compressed") and hasattr(edp_det, "save_compressed")):
        pytest.skip("edp_det.save_compressed/load_compressed not available yet")
    from edp_det.models import build_model

    torch.manual_seed(0)
    model = build_model("fasterrcnn", num_classes=4, depth=18, min_size=128, max_size=128, norm="frozen",
                        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10,
                        box_score_thresh=0.0)
    path = edp_det.save_compressed(model, tmp_path / "run" / "model_final.pt")
    m = eval_det.main(_args(model=path, data_root=synthetic_voc, split="test"))
    dets = json.loads((tmp_path / "run" / "eval_test" / "detections.json").read_text())
    assert dets and {d["category"] for d in dets} <= {"circle", "square", "triangle"}
    for d in dets:  # VOC 1-based boxes inside the 128 px images
        xmin, ymin, xmax, ymax = d["bbox"]
        assert 1 <= xmin and xmax <= 128 and 1 <= ymin and ymax <= 128
    assert m["num_images"] == 6 and 0.0 <= m["mAP_voc07"] <= 1.0 and 0.0 <= m["mAP_area"] <= 1.0
    assert set(m) >= {"mAP_voc07", "mAP_area", "ap_per_class", "coco_ap", "coco_ap50", "iou_thresh", "split",
                      "num_images"}
    # a model with a different number of classes is refused with exit code 2
    _expect_exit2(capsys, _args(model=path, data_root=synthetic_voc, classes="circle,square",
                                output_dir=tmp_path / "e"), "predicts 3 classes")
    _expect_exit2(capsys, _args(model=path, data_root=synthetic_voc, classes="circle,square,triangle,star",
                                output_dir=tmp_path / "e"), "predicts 3 classes", "star")


class _ResizedDataset(torch.utils.data.Dataset):
    """One image shown to the model at half size; target records the original (H, W)."""

    classes = ["cat", "dog"]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.zeros(3, 20, 30), {"image_id": "x", "orig_size": (40, 60)}


class _ConstModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return [{"boxes": torch.tensor([[2.0, 3.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]]),
                 "labels": torch.tensor([2, 7]), "scores": torch.tensor([0.75, 0.5])} for _ in images]


def test_predict_detections_scales_and_converts(tmp_path):
    from edp_det.evaluation.predict import predict_detections, save_detections_json

    model = _ConstModel().train()
    dets = predict_detections(model, _ResizedDataset())
    assert model.training  # mode restored
    # box x2 scaled by 60/30 = 2, y by 40/20 = 2: [4, 6, 20, 24] -> VOC [5, 7, 20, 24]; label 7 is out of 1..2: dropped
    assert dets == [{"image_id": "x", "category": "dog", "bbox": [5.0, 7.0, 20.0, 24.0], "score": 0.75}]
    save_detections_json(dets, tmp_path / "sub" / "d.json")
    assert json.loads((tmp_path / "sub" / "d.json").read_text()) == dets
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["d.json"]  # no temp file left behind


# ------------------------------------------------------------------------------------ refusals before any work
@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """A small real detector that records its classes (cat, dog), a classifier and a TorchScript archive."""
    import edp_det
    from edp_det.models import build_model

    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    det = build_model("fasterrcnn", num_classes=3, depth=18, norm="bn", min_size=64, max_size=64,
                      rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    files = {"det": edp_det.save_compressed(det, root / "det" / "model_final.pt", meta={"classes": ["cat", "dog"]}),
             "cls": edp_det.save_compressed(build_model("resnet18", num_classes=3), root / "cls" / "model_final.pt")}
    files["ts"] = root / "exported.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit deprecation
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(files["ts"]))
    return files


def test_earlier_results_are_refused_unless_overwrite(real_files, voc_root, tmp_path, capsys):
    """A second evaluation into the same folder is refused (one line naming the file and --overwrite) and leaves
    the earlier results as they were; --overwrite replaces them. A user's own detections.json in --output-dir is
    never replaced by --model mode without --overwrite."""
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([D("img1", "cat", [5, 5, 30, 30], 0.9)]))
    out = tmp_path / "ev"
    eval_det.main(_args(detections=dets, data_root=voc_root, output_dir=out))
    first = (out / "metrics.json").read_text()
    _expect_exit2(capsys, _args(detections=dets, data_root=voc_root, output_dir=out, iou_thresh=0.7),
                  f"--output-dir {out}", "metrics.json", "--overwrite")
    assert (out / "metrics.json").read_text() == first
    eval_det.main(_args(detections=dets, data_root=voc_root))   # the default folder, eval_test/ beside the input
    _expect_exit2(capsys, _args(detections=dets, data_root=voc_root), "default output folder", "metrics.json",
                  "--overwrite")
    m = eval_det.main(eval_det.get_args_parser().parse_args(
        ["--detections", str(dets), "--data-root", str(voc_root), "--output-dir", str(out), "--iou-thresh", "0.7",
         "--overwrite"]))
    assert m["iou_thresh"] == 0.7 and json.loads((out / "metrics.json").read_text())["iou_thresh"] == 0.7

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "detections.json").write_text("[]")
    _expect_exit2(capsys, _args(model=real_files["det"], data_root=voc_root, output_dir=mine), "detections.json",
                  "--overwrite")
    assert sorted(p.name for p in mine.iterdir()) == ["detections.json"]
    assert (mine / "detections.json").read_text() == "[]"


def test_classes_must_agree_with_the_model_file(real_files, voc_root, tmp_path, capsys):
    """--classes that permute the classes the model records are refused, naming both lists; in their order they
    evaluate."""
    err = _expect_exit2(capsys, _args(model=real_files["det"], data_root=voc_root, classes="dog,cat",
                                      output_dir=tmp_path / "a"), "--classes dog,cat", "cat,dog")
    assert err.count("\n") == 1
    assert not (tmp_path / "a").exists()
    m = eval_det.main(_args(model=real_files["det"], data_root=voc_root, classes="cat,dog",
                            output_dir=tmp_path / "b", device="cpu"))
    assert list(m["ap_per_class"]) == ["cat", "dog"]


def test_a_model_without_recorded_classes_takes_classes_as_given(voc_root, tmp_path, monkeypatch):
    import edp_det

    def unnamed(path):
        model = FakeDetector()
        model.classes = None   # a model file that records no class names
        return model

    path = tmp_path / "m.pt"
    path.write_bytes(b"placeholder")
    monkeypatch.setattr(edp_det, "load_compressed", unnamed, raising=False)
    m = eval_det.main(_args(model=path, data_root=voc_root, classes="dog,cat", output_dir=tmp_path / "e"))
    assert list(m["ap_per_class"]) == ["dog", "cat"]


@pytest.mark.parametrize("kind, needles", [
    ("cls", ["--model is a 'resnet18' model, not a detector"]),
    ("ts", ["TorchScript archive", "not an edp-det model file"]),
])
def test_model_that_is_not_a_detector_exit_2(real_files, voc_root, tmp_path, capsys, kind, needles):
    _expect_exit2(capsys, _args(model=real_files[kind], data_root=voc_root, output_dir=tmp_path / "e"),
                  str(real_files[kind]), *needles)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", ["0", "0.0", "1", "-0.5", "nan"])
def test_iou_thresh_must_be_between_0_and_1_exclusive(voc_root, tmp_path, capsys, value):
    from edp_det.evaluation.voc_eval import evaluate_voc
    from edp_det.runtime.errors import DataError

    p = tmp_path / "dets.json"
    p.write_text("[]")
    _expect_exit2(capsys, _args(detections=p, data_root=voc_root, iou_thresh=value), "--iou-thresh",
                  "> 0 and < 1")
    with pytest.raises(DataError, match="> 0 and < 1"):
        evaluate_voc([], {"img": []}, ["cat"], iou_thresh=float(value))
