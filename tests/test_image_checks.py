"""Up-front image checks (edp_det.data.imagecheck) and what the datasets and tasks do with them: every image
fully decoded before training, verdicts cached, on_error per training/evaluation split, a training split
without positives, and the EXIF size convention."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from edp_det.data import imagecheck
from edp_det.data.imagefolder import build_imagefolder, make_synthetic_imagefolder
from edp_det.data.voc import VOCDataset, read_split, validate_voc_split
from edp_det.runtime.config import load_config
from edp_det.methods import config_schema
from edp_det.runtime.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_synthetic.yaml"
SHAPES3 = ["circle", "square", "triangle"]


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut a file short, as an interrupted copy does; Image.verify() still accepts such a JPEG."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def voc(tmp_path, synthetic_voc) -> Path:
    dst = tmp_path / "voc"
    shutil.copytree(synthetic_voc, dst)
    return dst


@pytest.fixture
def imf(tmp_path) -> Path:
    root = tmp_path / "if"
    make_synthetic_imagefolder(root, 3, 2, image_size=32, seed=0)
    return root


@pytest.fixture
def decode_calls(monkeypatch) -> list:
    """Paths handed to the decoder (the real decoder still runs)."""
    calls: list = []
    real = imagecheck.decode_image

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(imagecheck, "decode_image", counting)
    return calls


# --------------------------------------------------------------------------------------------------
# full decode
# --------------------------------------------------------------------------------------------------
def test_decode_image_rejects_a_truncated_jpeg_that_verify_accepts(voc):
    path = voc / "JPEGImages" / "000003.jpg"
    assert imagecheck.decode_image(path).ok
    truncate(path)
    with Image.open(path) as im:
        im.verify()  # the old check: passes
    info = imagecheck.decode_image(path)
    assert not info.ok and "truncated" in info.error
    missing = imagecheck.decode_image(voc / "JPEGImages" / "nope.jpg")
    assert not missing.ok and "FileNotFoundError" in missing.error


def test_truncated_training_image_raise_lists_every_file_and_skip_skips(voc, caplog):
    ids = read_split(voc, "trainval")
    bad = [voc / "JPEGImages" / f"{ids[i]}.jpg" for i in (1, 4, 7)]
    for p in bad:
        truncate(p)
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    msg = str(ei.value)
    assert "3 problem(s)" in msg and "on_error=skip" in msg
    for p in bad:
        assert f"{p}: image='{p.name}': unreadable image" in msg
    with caplog.at_level(logging.WARNING, logger="edp_det.data.voc"):
        ds = VOCDataset(voc, "trainval", on_error="skip")
    assert len(ds) == len(ids) - 3 and not {ids[1], ids[4], ids[7]} & set(ds.image_ids)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and all(p.name in skipped[0] for p in bad)
    for i in range(len(ds)):  # every image left loads
        ds[i]


def test_bad_evaluation_image_needs_an_explicit_opt_in(voc):
    tid = read_split(voc, "test")[2]
    truncate(voc / "JPEGImages" / f"{tid}.jpg")
    kw = dict(classes=SHAPES3, use_difficult=True, evaluation=True)
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "test", on_error="skip", **kw)
    assert f"{tid}.jpg" in str(ei.value) and "data.skip_bad_eval_images=true" in str(ei.value)
    with pytest.raises(DataError, match=r"on_error=skip with skip_bad_eval_images=true drops"):
        VOCDataset(voc, "test", **kw)
    ds = VOCDataset(voc, "test", on_error="skip", skip_bad_eval_images=True, **kw)
    assert len(ds) == 5 and tid not in ds.image_ids
    # the same through the detection task's config
    from edp_det.train.detection import DetectionTask

    def setup(*overrides):
        cfg = load_config(TINY, [f"data.root={voc}", "data.on_error=skip", *overrides],
                          schema=config_schema("detection"))
        task = DetectionTask(cfg)
        task.setup(SimpleNamespace(world_size=1, rank=0, distributed=False))
        return task

    with pytest.raises(DataError, match="skip_bad_eval_images"):
        setup()
    task = setup("data.skip_bad_eval_images=true")
    assert len(task.test_set) == 5 and len(task.train_set) == 12


def test_cli_truncated_training_image_exits_2_before_training(voc, tmp_path):
    bad = voc / "JPEGImages" / f"{read_split(voc, 'trainval')[0]}.jpg"
    truncate(bad)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_det.py"), "--config", str(TINY),
                        "--data-root", str(voc), "--output-dir", str(out), "model.min_size=64", "model.max_size=64",
                        "benchmark.enabled=false"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{bad}: image='{bad.name}': unreadable image" in r.stderr and "Traceback" not in r.stderr
    assert not list(out.glob("checkpoint*")) and not (out / "metrics_log.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# cache, threads, progress
# --------------------------------------------------------------------------------------------------
def test_second_validation_decodes_nothing_and_changed_files_are_checked_again(voc, tmp_path, decode_calls):
    cache = tmp_path / "cache"
    VOCDataset(voc, "trainval", image_cache=cache)
    assert len(decode_calls) == 12
    decode_calls.clear()
    VOCDataset(voc, "trainval", image_cache=cache)
    assert decode_calls == []
    assert len(list(cache.rglob("*.json"))) == 1
    changed = voc / "JPEGImages" / f"{read_split(voc, 'trainval')[5]}.jpg"
    truncate(changed)
    with pytest.raises(DataError, match=changed.name):
        VOCDataset(voc, "trainval", image_cache=cache)
    assert decode_calls == [str(changed)]
    decode_calls.clear()
    VOCDataset(voc, "trainval", image_cache=False, on_error="skip")  # no cache: everything decoded again
    assert len(decode_calls) == 12


def test_check_images_report_threads_and_summary_line(voc, tmp_path, caplog):
    paths = sorted((voc / "JPEGImages").glob("*.jpg"))
    truncate(paths[2])
    cache = tmp_path / "c.json"
    with caplog.at_level(logging.INFO, logger="edp_det.data.imagecheck"):
        first = imagecheck.check_images(paths, cache_file=cache, workers=2, desc="unit")
    assert (first.decoded, first.cached) == (len(paths), 0) and list(first.bad) == [str(paths[2])]
    assert f"unit: {len(paths)} image(s): {len(paths)} decoded" in caplog.text and "1 unreadable" in caplog.text
    serial = imagecheck.check_images(paths, workers=1, show_progress=False)
    assert serial.infos == first.infos
    second = imagecheck.check_images(paths, cache_file=cache)
    assert (second.decoded, second.cached) == (0, len(paths)) and second.infos == first.infos
    cache.write_text("{not json")  # a damaged cache is ignored, not fatal
    assert imagecheck.check_images(paths, cache_file=cache).decoded == len(paths)


def test_default_cache_location_and_bad_setting(voc, tmp_path, monkeypatch):
    monkeypatch.setenv("EDP_DET_CACHE_DIR", str(tmp_path / "user_cache"))
    f = imagecheck.image_cache_file(voc)
    assert f.parent == tmp_path / "user_cache" / "image_checks" and f.name.startswith("voc-")
    assert imagecheck.image_cache_file(voc, tmp_path / "x").parent == tmp_path / "x" / "image_checks"
    assert imagecheck.image_cache_file(voc, False) is None
    VOCDataset(voc, "trainval")
    assert f.is_file() and not list(voc.rglob("*.json"))  # nothing written into the dataset
    with pytest.raises(ConfigError, match="image_cache=5"):
        imagecheck.image_cache_file(voc, 5)


# --------------------------------------------------------------------------------------------------
# a training split without positives
# --------------------------------------------------------------------------------------------------
def test_all_difficult_training_split_is_an_error_naming_the_split(voc):
    for xml in (voc / "Annotations").glob("*.xml"):
        tree = ET.parse(xml)
        for o in tree.getroot().findall("object"):
            d = o.find("difficult")
            if d is None:
                d = ET.SubElement(o, "difficult")
            d.text = "1"
        tree.write(xml)
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    assert "split 'trainval'" in str(ei.value) and "difficult" in str(ei.value)
    assert len(VOCDataset(voc, "trainval", use_difficult=True)) == 12
    assert len(VOCDataset(voc, "test", classes=SHAPES3, evaluation=True)) == 6


# --------------------------------------------------------------------------------------------------
# EXIF orientation convention
# --------------------------------------------------------------------------------------------------
def _exif_voc(root: Path, xml_size, orientation: int = 6) -> Path:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (40, 20), (0, 0, 255)).save(root / "JPEGImages" / "img1.jpg", exif=exif.tobytes())
    w, h = xml_size
    (root / "Annotations" / "img1.xml").write_text(
        f"<annotation><filename>img1.jpg</filename><size><width>{w}</width><height>{h}</height></size>"
        "<object><name>circle</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>15</xmax><ymax>15</ymax>"
        "</bndbox></object></annotation>")
    (root / "ImageSets/Main/trainval.txt").write_text("img1\n")
    return root


def test_exif_rotated_image_annotated_on_the_raw_frame_is_an_error(tmp_path):
    root = _exif_voc(tmp_path / "raw", (40, 20))  # stored frame 40x20, displayed 20x40
    with pytest.raises(DataError) as ei:
        VOCDataset(root, "trainval")
    msg = str(ei.value)
    assert str(root / "JPEGImages" / "img1.jpg") in msg and "size='40x20'" in msg and "orientation 6" in msg
    assert "exiftool -n -Orientation=1" in msg and "re-export the annotation" in msg
    _, problems = validate_voc_split(root, "trainval")
    assert [(p.field, p.severity) for p in problems] == [("size", "error")]
    # the displayed size is the convention: accepted, and the loader returns that frame
    ok = _exif_voc(tmp_path / "shown", (20, 40))
    img, tgt = VOCDataset(ok, "trainval")[0]
    assert tuple(img.shape) == (3, 40, 20) and tgt["orig_size"] == (40, 20)
    info = imagecheck.decode_image(ok / "JPEGImages" / "img1.jpg")
    assert (info.width, info.height, info.orientation, info.display_size) == (40, 20, 6, (20, 40))


# --------------------------------------------------------------------------------------------------
# classification ImageFolder
# --------------------------------------------------------------------------------------------------
def test_imagefolder_truncated_images_train_and_val(imf):
    bad = sorted((imf / "train" / "circle").glob("*.JPEG"))[0]
    truncate(bad, 0.5)
    with Image.open(bad) as im:
        im.verify()
    with pytest.raises(DataError) as ei:
        build_imagefolder(imf, "train", train=True, image_size=32)
    assert f"{bad}: image='{bad.name}': unreadable image" in str(ei.value)
    assert len(build_imagefolder(imf, "train", train=True, image_size=32, on_error="skip")) == 8
    vbad = sorted((imf / "val" / "square").glob("*.JPEG"))[1]
    truncate(vbad, 0.5)
    kw = dict(train=False, image_size=32, on_error="skip", evaluation=True)
    with pytest.raises(DataError, match="skip_bad_eval_images"):
        build_imagefolder(imf, "val", **kw)
    assert len(build_imagefolder(imf, "val", skip_bad_eval_images=True, **kw)) == 5
    # the same through the classification task's config
    from edp_det.train.classification import ClassificationTask

    cfg = load_config(None, [f"data.root={imf}", "data.on_error=skip", "data.image_size=32"],
                      schema=config_schema("classification"))
    with pytest.raises(DataError, match="skip_bad_eval_images"):
        ClassificationTask(cfg).setup(SimpleNamespace(world_size=1, rank=0, distributed=False))


def test_imagefolder_file_broken_after_the_check_names_the_file(imf):
    ds = build_imagefolder(imf, "train", train=True, image_size=32)
    path = ds.samples[0][0]
    truncate(path, 0.5)
    with pytest.raises(DataError, match=rf"{Path(path).name}: image: cannot read image \(OSError"):
        ds[0]
