"""ImageFolder validation/building and the synthetic classification generator."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from edp_det.data.imagefolder import build_imagefolder, make_synthetic_imagefolder, validate_imagefolder
from edp_det.runtime.errors import ConfigError, DataError

CLASSES = ["circle", "square", "triangle"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean_if(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    make_synthetic_imagefolder(root, 3, 2, image_size=32, seed=0)
    return root


@pytest.fixture
def imf(tmp_path, clean_if) -> Path:
    dst = tmp_path / "if"
    shutil.copytree(clean_if, dst)
    return dst


def test_clean_dataset(clean_if):
    samples, problems = validate_imagefolder(clean_if, "train")
    assert problems == [] and len(samples) == 9
    assert sorted({c for _, c in samples}) == [0, 1, 2]
    tr = build_imagefolder(clean_if, "train", train=True, image_size=24)
    va = build_imagefolder(clean_if, "val", train=False, image_size=24)
    assert tr.classes == va.classes == CLASSES and len(tr) == 9 and len(va) == 6
    x, y = va[0]
    assert tuple(x.shape) == (3, 24, 24) and x.dtype == torch.float32 and y == 0
    assert va.targets == [0, 0, 1, 1, 2, 2]
    assert float(x.min()) < 0  # ImageNet normalisation applied
    assert tuple(tr[4][0].shape) == (3, 24, 24)


def test_generator_deterministic(tmp_path, clean_if):
    make_synthetic_imagefolder(tmp_path / "again", 3, 2, image_size=32, seed=0)
    files = sorted(p.relative_to(clean_if) for p in clean_if.rglob("*.JPEG"))
    assert len(files) == 15
    for rel in files:
        assert (clean_if / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes()
    make_synthetic_imagefolder(tmp_path / "other", 1, 0, image_size=32, seed=1)
    assert (tmp_path / "other/train/circle/circle_00000.JPEG").read_bytes() != (clean_if / "train/circle/circle_00000.JPEG").read_bytes()


def test_missing_split(imf):
    shutil.rmtree(imf / "val")
    samples, problems = validate_imagefolder(imf, "val")
    assert samples == [] and [(p.field, p.severity) for p in problems] == [("split", "error")]
    with pytest.raises(DataError, match=r"val: split='val': split folder not found"):
        build_imagefolder(imf, "val", train=False)
    shutil.rmtree(imf / "train")
    with pytest.raises(DataError, match=r"train: split='train': train folder not found"):
        build_imagefolder(imf, "train", train=True)


def test_empty_class_folder(imf):
    (imf / "train" / "star").mkdir()
    samples, problems = validate_imagefolder(imf, "train")
    assert [(p.image_id, p.field, p.severity) for p in problems] == [("star", "images", "error")]
    with pytest.raises(DataError, match=r"train/star: images=0: class folder holds no image files"):
        build_imagefolder(imf, "train", train=True)
    # val lacks "star": only a warning there, labels still follow the train class list
    va = build_imagefolder(imf, "val", train=False, image_size=16)
    assert va.classes == ["circle", "square", "star", "triangle"] and va.targets == [0, 0, 1, 1, 3, 3]


def test_unreadable_image(imf):
    bad = imf / "train" / "square" / "broken.JPEG"
    bad.write_bytes(b"not an image at all")
    samples, problems = validate_imagefolder(imf, "train")
    assert len(samples) == 9 and len(problems) == 1
    assert problems[0].file == str(bad) and problems[0].field == "image"
    with pytest.raises(DataError, match=r"broken\.JPEG: image='broken\.JPEG': unreadable image"):
        build_imagefolder(imf, "train", train=True)
    ds = build_imagefolder(imf, "train", train=True, image_size=16, on_error="skip")
    assert len(ds) == 9 and [p.file for p in ds.skipped] == [str(bad)]
    assert str(bad) not in [s for s, _ in ds.samples]


def test_val_class_missing_from_train(imf):
    (imf / "val" / "hexagon").mkdir()
    shutil.copy(imf / "val/circle/circle_00000.JPEG", imf / "val/hexagon/h.JPEG")
    samples, problems = validate_imagefolder(imf, "val")
    assert [(p.image_id, p.field) for p in problems] == [("hexagon", "class")]
    with pytest.raises(DataError, match=r"val/hexagon: class='hexagon': class folder is not among the train classes"):
        build_imagefolder(imf, "val", train=False)
    ds = build_imagefolder(imf, "val", train=False, on_error="skip", image_size=16)
    assert ds.classes == CLASSES and len(ds) == 6


def test_val_missing_a_train_class_keeps_labels(imf):
    shutil.rmtree(imf / "val" / "square")
    samples, problems = validate_imagefolder(imf, "val")
    assert [(p.image_id, p.severity) for p in problems] == [("square", "warning")]
    va = build_imagefolder(imf, "val", train=False, image_size=16)
    assert va.classes == CLASSES and va.targets == [0, 0, 2, 2]


def test_bad_arguments(clean_if):
    with pytest.raises(ConfigError, match="on_error='maybe'"):
        build_imagefolder(clean_if, "train", train=True, on_error="maybe")
    with pytest.raises(ConfigError, match="classes="):
        make_synthetic_imagefolder(clean_if / "x", 1, 1, classes=("blob",))


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("msi", REPO / "tools" / "make_synthetic_imagefolder.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tool.get_args_parser().parse_args(
        ["--out", str(tmp_path / "c"), "--num-train", "2", "--num-val", "1", "--image-size", "32"]))
    assert "wrote 2 train + 1 val images per class for 3 classes" in capsys.readouterr().out
    assert len(list((tmp_path / "c").rglob("*.JPEG"))) == 9
