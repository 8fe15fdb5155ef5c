"""VOC reader, validation, image loading and transforms (edp_det.data.voc / .transforms)."""

from __future__ import annotations

import logging
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edp_det.data.transforms import build_transforms
from edp_det.data.voc import (
    VOC07_CLASSES,
    VOCDataset,
    collate_fn,
    collect_classes,
    load_image,
    parse_voc_xml,
    read_split,
    resolve_voc_root,
    validate_voc_split,
    voc_to_xyxy,
    xyxy_to_voc,
)
from edp_det.runtime.errors import ConfigError, DataError, EDPError

SHAPES3 = ["circle", "square", "triangle"]


# --------------------------------------------------------------------------------------------------
# helpers (plain ElementTree, independent of the reader under test)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def voc(tmp_path, synthetic_voc) -> Path:
    """A private, writable copy of the synthetic dataset."""
    dst = tmp_path / "voc"
    shutil.copytree(synthetic_voc, dst)
    return dst


def raw_objects(xml_path: Path) -> list[dict]:
    root = ET.parse(xml_path).getroot()
    out = []
    for o in root.findall("object"):
        bb = o.find("bndbox")
        out.append({
            "name": o.findtext("name"),
            "bbox": [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": o.findtext("difficult") == "1",
        })
    return out


def edit_xml(xml_path: Path, fn) -> None:
    tree = ET.parse(xml_path)
    fn(tree.getroot())
    tree.write(xml_path)


def first_id_with(root: Path, split: str, pred) -> str:
    for i in (root / "ImageSets/Main" / f"{split}.txt").read_text().split():
        if pred(raw_objects(root / "Annotations" / f"{i}.xml")):
            return i
    raise AssertionError("no such image in the fixture")


def make_voc_one(root: Path, image: Image.Image, fname: str, xml_size, boxes=(("circle", [2, 2, 10, 12]),),
                 save_kwargs=None) -> Path:
    """A one-image VOC dataset with the given PIL image saved as JPEGImages/fname."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    image.save(root / "JPEGImages" / fname, **(save_kwargs or {}))
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in boxes
    )
    w, h = xml_size
    (root / "Annotations" / "img1.xml").write_text(
        f"<annotation><filename>{fname}</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )
    (root / "ImageSets/Main/trainval.txt").write_text("img1\n")
    return root


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def test_voc07_classes():
    assert len(VOC07_CLASSES) == 20
    assert VOC07_CLASSES[0] == "aeroplane" and VOC07_CLASSES[14] == "person" and VOC07_CLASSES[-1] == "tvmonitor"


def test_synthetic_counts_classes_and_items(synthetic_voc):
    assert len(read_split(synthetic_voc, "trainval")) == 12
    assert read_split(synthetic_voc, "train") == read_split(synthetic_voc, "trainval")
    assert collect_classes(synthetic_voc, "trainval") == SHAPES3
    ds = VOCDataset(synthetic_voc, "trainval")
    assert len(ds) == 12 and ds.classes == SHAPES3 and ds.num_classes == 3 and ds.skipped == []
    assert len(VOCDataset(synthetic_voc, "test", classes=SHAPES3)) == 6
    img, tgt = ds[0]
    assert img.dtype == torch.float32 and tuple(img.shape) == (3, 128, 128)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.max()) > 0.5
    assert tgt["boxes"].dtype == torch.float32 and tgt["boxes"].shape[1] == 4
    assert tgt["labels"].dtype == torch.int64 and tgt["difficult"].dtype == torch.bool
    assert tgt["image_id"] == "000000" and tgt["orig_size"] == (128, 128)
    assert set(tgt["labels"].tolist()) <= {1, 2, 3}


def test_box_convention_round_trip(synthetic_voc):
    assert voc_to_xyxy([1, 1, 10, 20]) == [0.0, 0.0, 10.0, 20.0]
    assert xyxy_to_voc([0, 0, 10, 20]) == [1.0, 1.0, 10.0, 20.0]
    ds = VOCDataset(synthetic_voc, "trainval", use_difficult=True)
    for i in range(len(ds)):
        _, tgt = ds[i]
        raw = raw_objects(synthetic_voc / "Annotations" / f"{tgt['image_id']}.xml")
        expected = torch.tensor([[b["bbox"][0] - 1, b["bbox"][1] - 1, b["bbox"][2], b["bbox"][3]] for b in raw])
        assert torch.equal(tgt["boxes"], expected.float())
        assert tgt["labels"].tolist() == [SHAPES3.index(b["name"]) + 1 for b in raw]
        back = [xyxy_to_voc(b) for b in tgt["boxes"].tolist()]
        assert back == [b["bbox"] for b in raw]
    ann = ds.annotations()
    assert set(ann) == set(ds.image_ids)
    first = ann["000000"]
    assert [a["bbox"] for a in first] == [b["bbox"] for b in raw_objects(synthetic_voc / "Annotations/000000.xml")]


def test_difficult_filtering(synthetic_voc):
    ds_all = VOCDataset(synthetic_voc, "trainval", use_difficult=True)
    ds = VOCDataset(synthetic_voc, "trainval")
    n_diff_xml = sum(
        b["difficult"] for i in ds.image_ids for b in raw_objects(synthetic_voc / "Annotations" / f"{i}.xml")
    )
    assert n_diff_xml > 0, "fixture should contain difficult objects"
    assert sum(int(ds_all[i][1]["difficult"].sum()) for i in range(len(ds_all))) == n_diff_xml
    assert all(not ds[i][1]["difficult"].any() for i in range(len(ds)))
    n_all = sum(len(ds_all[i][1]["boxes"]) for i in range(len(ds)))
    assert sum(len(ds[i][1]["boxes"]) for i in range(len(ds))) == n_all - n_diff_xml
    # the evaluator view keeps difficult objects whatever use_difficult says
    assert sum(a["difficult"] for objs in ds.annotations().values() for a in objs) == n_diff_xml


def test_raccoon_real_data(raccoon_root):
    assert len(read_split(raccoon_root, "trainval")) == 160
    assert len(read_split(raccoon_root, "test")) == 40
    ds = VOCDataset(raccoon_root, "trainval")
    assert len(ds) == 160 and ds.classes == ["raccoon"] and ds.skipped == []
    assert len(VOCDataset(raccoon_root, "test")) == 40
    rec = parse_voc_xml(raccoon_root / "Annotations" / "raccoon-1.xml")
    assert rec["filename"] == "raccoon-1.jpg" and (rec["width"], rec["height"]) == (650, 417)
    assert rec["objects"] == [{"name": "raccoon", "bbox": [81.0, 88.0, 522.0, 408.0], "difficult": False,
                               "truncated": False}]
    img, tgt = ds[ds.image_ids.index("raccoon-1")]
    assert tuple(img.shape) == (3, 417, 650) and tgt["orig_size"] == (417, 650)
    assert tgt["boxes"].tolist() == [[80.0, 87.0, 522.0, 408.0]] and tgt["labels"].tolist() == [1]


def test_vocdevkit_nesting(tmp_path, synthetic_voc):
    devkit = tmp_path / "VOCdevkit"
    devkit.mkdir()
    (devkit / "VOC2007").symlink_to(synthetic_voc, target_is_directory=True)
    assert resolve_voc_root(devkit) == devkit / "VOC2007"
    assert len(VOCDataset(devkit, "test")) == 6
    (devkit / "VOC2012").symlink_to(synthetic_voc, target_is_directory=True)
    with pytest.raises(DataError, match="VOC2007, VOC2012"):
        resolve_voc_root(devkit)
    with pytest.raises(DataError, match="Annotations"):
        resolve_voc_root(tmp_path)


def test_collate_fn_with_dataloader(synthetic_voc):
    ds = VOCDataset(synthetic_voc, "test")
    images, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert [t["image_id"] for t in targets] == ds.image_ids[:3]


# --------------------------------------------------------------------------------------------------
# bad data: every case names file and field; skip policy drops exactly the bad items
# --------------------------------------------------------------------------------------------------
def test_missing_image(voc, caplog):
    (voc / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    msg = str(ei.value)
    assert "000001.jpg" in msg and "image=" in msg and "not found" in msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, EDPError)
    with caplog.at_level(logging.WARNING, logger="edp_det.data.voc"):
        ds = VOCDataset(voc, "trainval", on_error="skip")
    assert len(ds) == 11 and "000001" not in ds.image_ids
    assert [(p.image_id, p.field) for p in ds.skipped] == [("000001", "image")]
    assert "skipped 1 image(s)" in caplog.text


def test_missing_annotation(voc):
    (voc / "Annotations" / "000002.xml").unlink()
    with pytest.raises(DataError, match=r"000002\.xml: annotation='000002': annotation file not found"):
        VOCDataset(voc, "trainval")
    ds = VOCDataset(voc, "trainval", on_error="skip")
    assert len(ds) == 11 and [(p.image_id, p.field) for p in ds.skipped] == [("000002", "annotation")]


def test_malformed_xml(voc):
    (voc / "Annotations" / "000003.xml").write_text("<annotation><size><width>12</width>")
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    assert "000003.xml: xml=" in str(ei.value) and "malformed XML" in str(ei.value)
    with pytest.raises(DataError, match=r"000003\.xml"):
        parse_voc_xml(voc / "Annotations" / "000003.xml")
    ds = VOCDataset(voc, "trainval", on_error="skip")
    assert len(ds) == 11 and [(p.image_id, p.field) for p in ds.skipped] == [("000003", "xml")]


def test_missing_size_and_non_numeric_coordinate(voc):
    xml = voc / "Annotations" / "000004.xml"
    edit_xml(xml, lambda r: r.find("size").remove(r.find("size/width")))
    with pytest.raises(DataError, match=r"000004\.xml.*size/width=None: missing field"):
        parse_voc_xml(xml)
    xml5 = voc / "Annotations" / "000005.xml"
    n5 = len(raw_objects(xml5))

    def bad_coord(r):
        r.find("object/bndbox/xmin").text = "abc"

    edit_xml(xml5, bad_coord)
    with pytest.raises(DataError, match=r"000005\.xml.*object\[0\]/bndbox/xmin='abc': coordinate is not a number"):
        parse_voc_xml(xml5)
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    assert "000004.xml" in str(ei.value) and "000005.xml" in str(ei.value) and "2 problem(s)" in str(ei.value)
    ds = VOCDataset(voc, "trainval", on_error="skip", use_difficult=True)
    assert len(ds) == 11  # 000004 dropped (image-level), 000005 kept without its bad object
    assert sorted((p.image_id, p.field, p.object_index) for p in ds.skipped) == [
        ("000004", "size/width", None), ("000005", "object[0]/bndbox/xmin", 0)]
    _, tgt = ds[ds.image_ids.index("000005")]
    assert len(tgt["boxes"]) == n5 - 1


def test_degenerate_box_drops_only_that_object(voc):
    iid = first_id_with(voc, "trainval", lambda objs: len(objs) >= 2 and not any(o["difficult"] for o in objs))
    xml = voc / "Annotations" / f"{iid}.xml"
    objs = raw_objects(xml)

    def flatten(r):
        bb = r.find("object/bndbox")
        bb.find("xmax").text = bb.find("xmin").text

    edit_xml(xml, flatten)
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    msg = str(ei.value)
    assert f"{iid}.xml: object[0]/bndbox=" in msg and "degenerate" in msg
    ds = VOCDataset(voc, "trainval", on_error="skip")
    assert len(ds) == 12
    assert [(p.image_id, p.field) for p in ds.skipped] == [(iid, "object[0]/bndbox")]
    _, tgt = ds[ds.image_ids.index(iid)]
    expected = [voc_to_xyxy(o["bbox"]) for o in objs[1:]]
    assert tgt["boxes"].tolist() == expected


def test_box_outside_image_and_tolerance(voc):
    ids = read_split(voc, "trainval")
    xml_far, xml_near = voc / "Annotations" / f"{ids[0]}.xml", voc / "Annotations" / f"{ids[1]}.xml"

    def push(amount):
        def f(r):
            r.find("object/bndbox/xmax").text = str(128 + amount)
            r.find("object/difficult").text = "0"
        return f

    edit_xml(xml_far, push(10))
    edit_xml(xml_near, push(1))  # within the 1-px tolerance: kept and clipped
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    msg = str(ei.value)
    assert f"{ids[0]}.xml: object[0]/bndbox=" in msg and "outside the 128x128 image" in msg
    assert f"{ids[1]}.xml" not in msg
    ds = VOCDataset(voc, "trainval", on_error="skip")
    assert [(p.image_id, p.field) for p in ds.skipped] == [(ids[0], "object[0]/bndbox")]
    _, tgt = ds[1]
    assert tgt["boxes"][0, 2].item() == 128.0  # clipped to the image width


def test_unknown_class(voc):
    iid = read_split(voc, "trainval")[2]
    n = len(raw_objects(voc / "Annotations" / f"{iid}.xml"))

    def rename(r):
        r.find("object/name").text = "blob"
        r.find("object/difficult").text = "0"

    edit_xml(voc / "Annotations" / f"{iid}.xml", rename)
    with pytest.raises(DataError, match=rf"{iid}\.xml: object\[0\]/name='blob': unknown class name"):
        VOCDataset(voc, "trainval", classes=SHAPES3)
    ds = VOCDataset(voc, "trainval", classes=SHAPES3, on_error="skip", use_difficult=True)
    assert [(p.image_id, p.field, p.value) for p in ds.skipped] == [(iid, "object[0]/name", "blob")]
    assert len(ds) == 12 and len(ds[2][1]["boxes"]) == n - 1
    # without a class list the new name is simply collected
    assert VOCDataset(voc, "trainval").classes == ["blob"] + SHAPES3


def test_empty_and_missing_split(voc):
    (voc / "ImageSets/Main/test.txt").write_text("\n\n")
    for policy in ("raise", "skip"):
        with pytest.raises(DataError, match=r"test\.txt: split='test': split file lists no image ids"):
            VOCDataset(voc, "test", on_error=policy)
    with pytest.raises(DataError, match=r"val\.txt: split='val': split file not found \(available splits: .*trainval"):
        VOCDataset(voc, "val", on_error="skip")
    with pytest.raises(DataError, match=r"val\.txt"):
        read_split(voc, "val")


def test_corrupt_image(voc):
    (voc / "JPEGImages" / "000006.jpg").write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    assert "000006.jpg: image='000006.jpg': unreadable image" in str(ei.value)
    ds = VOCDataset(voc, "trainval", on_error="skip")
    assert len(ds) == 11 and [(p.image_id, p.field) for p in ds.skipped] == [("000006", "image")]
    with pytest.raises(DataError, match=r"000006\.jpg: image: cannot read image"):
        load_image(voc / "JPEGImages" / "000006.jpg")


def test_all_problems_listed_at_once(voc):
    (voc / "JPEGImages" / "000001.jpg").unlink()
    (voc / "Annotations" / "000003.xml").write_text("<annotation>")
    (voc / "JPEGImages" / "000006.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "trainval")
    msg = str(ei.value)
    assert "3 problem(s)" in msg
    for part in ("000001.jpg", "000003.xml", "000006.jpg"):
        assert part in msg
    ds = VOCDataset(voc, "trainval", on_error="skip")
    assert sorted(p.image_id for p in ds.skipped) == ["000001", "000003", "000006"] and len(ds) == 9


def test_many_problems_are_truncated_in_message(voc):
    ids = read_split(voc, "trainval") + read_split(voc, "test")
    (voc / "ImageSets/Main/all.txt").write_text("\n".join(ids + [f"ghost{i}" for i in range(25)]))
    with pytest.raises(DataError) as ei:
        VOCDataset(voc, "all")
    assert "25 problem(s)" in str(ei.value) and "... and 5 more problem(s)" in str(ei.value)


def test_size_mismatch_is_a_warning_and_no_objects_is_info(voc):
    def grow(r):
        r.find("size/width").text = "130"

    edit_xml(voc / "Annotations" / "000000.xml", grow)

    def clear(r):
        for o in r.findall("object"):
            r.remove(o)

    edit_xml(voc / "Annotations" / "000007.xml", clear)
    records, problems = validate_voc_split(voc, "trainval", classes=SHAPES3)
    assert len(records) == 12
    by_id = {p.image_id: p for p in problems}
    assert by_id["000000"].severity == "warning" and by_id["000000"].field == "size"
    assert "000000.xml" in str(by_id["000000"]) and "130x128" in str(by_id["000000"])
    assert by_id["000007"].severity == "info"
    ds = VOCDataset(voc, "trainval")  # warnings/info do not raise
    _, tgt = ds[ds.image_ids.index("000007")]
    assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,)


def test_filename_fallback_and_bad_arguments(voc):
    def rename(r):
        r.find("filename").text = "does_not_exist.jpg"

    edit_xml(voc / "Annotations" / "000000.xml", rename)
    ds = VOCDataset(voc, "trainval")  # falls back to <id>.jpg
    assert ds.records[0].image_path.name == "000000.jpg"
    with pytest.raises(ConfigError, match="on_error='ignore'"):
        VOCDataset(voc, "trainval", on_error="ignore")


# --------------------------------------------------------------------------------------------------
# image modes / EXIF
# --------------------------------------------------------------------------------------------------
def test_grayscale_png_palette_rgba_images(tmp_path):
    gray = Image.new("L", (30, 20), 128)
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 255))
    pal = Image.new("RGB", (30, 20), (200, 10, 10)).convert("P", palette=Image.ADAPTIVE)
    for name, im, fname in (("gray", gray, "img1.jpg"), ("rgba", rgba, "img1.png"), ("pal", pal, "img1.png")):
        root = make_voc_one(tmp_path / name, im, fname, (30, 20))
        ds = VOCDataset(root, "trainval")
        img, tgt = ds[0]
        assert tuple(img.shape) == (3, 20, 30), name
        assert tgt["orig_size"] == (20, 30)
        assert load_image(root / "JPEGImages" / fname).mode == "RGB"
    gray_img = VOCDataset(tmp_path / "gray", "trainval")[0][0]
    assert torch.allclose(gray_img[0], gray_img[1]) and abs(float(gray_img.mean()) - 128 / 255) < 0.02
    rgba_img = VOCDataset(tmp_path / "rgba", "trainval")[0][0]
    assert torch.allclose(rgba_img[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)


def test_exif_rotated_image(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[274] = 6  # display = rotate 90 degrees clockwise -> 20 wide, 40 tall, red on top
    root = make_voc_one(tmp_path / "exif", stored, "img1.jpg", (20, 40), boxes=(("circle", [1, 1, 20, 20]),),
                        save_kwargs={"exif": exif.tobytes(), "quality": 95})
    records, problems = validate_voc_split(root, "trainval")
    assert not [p for p in problems if p.severity != "info"], problems  # XML size matches the rotated image
    img, tgt = VOCDataset(root, "trainval")[0]
    assert tuple(img.shape) == (3, 40, 20) and tgt["orig_size"] == (40, 20)
    top, bottom = img[:, 5, 10], img[:, 35, 10]
    assert top[0] > 0.9 and top[2] < 0.1 and bottom[2] > 0.9 and bottom[0] < 0.1


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------
def test_hflip_hand_computed():
    t = build_transforms({"hflip": 1.0, "min_visibility": 0.0}, train=True)
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :10] = 255
    boxes = np.array([[10, 20, 30, 40], [0, 0, 100, 50]], np.float32)
    out = t(image=img, bboxes=boxes, labels=[2, 1], difficult=[False, True])
    np.testing.assert_allclose(np.asarray(out["bboxes"]), [[70, 20, 90, 40], [0, 0, 100, 50]], atol=1e-4)
    assert list(map(int, out["labels"])) == [2, 1] and list(map(bool, out["difficult"])) == [False, True]
    assert out["image"][:, 90:].min() == 255 and out["image"][:, :90].max() == 0


def test_dataset_with_hflip_matches_mirrored_boxes(synthetic_voc):
    plain = VOCDataset(synthetic_voc, "test", use_difficult=True)
    flipped = VOCDataset(synthetic_voc, "test", use_difficult=True,
                         transforms=build_transforms({"hflip": 1.0, "min_visibility": 0.0}, train=True))
    for i in range(len(plain)):
        (a, ta), (b, tb) = plain[i], flipped[i]
        assert torch.equal(b, a.flip(-1))
        mirrored = ta["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([128.0, 0, 128.0, 0])
        torch.testing.assert_close(tb["boxes"], mirrored, atol=1e-3, rtol=0)
        assert torch.equal(tb["labels"], ta["labels"]) and torch.equal(tb["difficult"], ta["difficult"])


def test_eval_transforms_and_resize(synthetic_voc):
    ds = VOCDataset(synthetic_voc, "test", use_difficult=True)
    ev = VOCDataset(synthetic_voc, "test", use_difficult=True, transforms=build_transforms(None, train=False))
    half = VOCDataset(synthetic_voc, "test", use_difficult=True,
                      transforms=build_transforms({"resize": 64}, train=False))
    (a, ta), (b, tb), (c, tc) = ds[0], ev[0], half[0]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert tuple(c.shape) == (3, 64, 64) and tc["orig_size"] == (128, 128)
    torch.testing.assert_close(tc["boxes"], ta["boxes"] / 2, atol=1e-3, rtol=0)


def test_vanishing_boxes_drop_labels_and_flags():
    # zoom x2 around the centre of a 100x100 image: a box in the corner leaves the canvas
    t = build_transforms({"hflip": 0.0, "scale_jitter": [2.0, 2.0], "min_visibility": 0.3}, train=True)
    img = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[0, 0, 10, 10], [45, 45, 55, 55]], np.float32)
    out = t(image=img, bboxes=boxes, labels=[1, 3], difficult=[False, True])
    np.testing.assert_allclose(np.asarray(out["bboxes"]), [[40, 40, 60, 60]], atol=1e-3)
    assert list(map(int, out["labels"])) == [3] and list(map(bool, out["difficult"])) == [True]


def test_transform_config_errors():
    with pytest.raises(ConfigError, match=r"transforms\.hflp=0\.5: unknown option"):
        build_transforms({"hflp": 0.5}, train=True)
    with pytest.raises(ConfigError, match=r"transforms\.hflip=2"):
        build_transforms({"hflip": 2}, train=True)
    with pytest.raises(ConfigError, match=r"transforms\.scale_jitter=\[1\.2, 0\.8\]"):
        build_transforms({"scale_jitter": [1.2, 0.8]}, train=True)
    with pytest.raises(ConfigError, match=r"transforms\.resize='big'"):
        build_transforms({"resize": "big"}, train=False)
    full = build_transforms({"hflip": 0.5, "scale_jitter": [0.8, 1.2], "brightness_contrast": 0.2,
                             "hue_saturation": 0.2, "seed": 1}, train=True)
    out = full(image=np.full((64, 64, 3), 100, np.uint8), bboxes=np.array([[20, 20, 40, 40]], np.float32),
               labels=[1], difficult=[False])
    assert out["image"].shape == (64, 64, 3) and len(out["bboxes"]) == 1


def test_a_rare_class_name_is_reported_as_a_probable_typo(tmp_path, caplog):
    """Classes collected from the annotations: a name only one object carries, among classes with many, is warned
    about with its file (it would silently become a class of its own); a split without one gives no warning."""
    from edp_det.data.synthetic import make_synthetic_voc

    root = tmp_path / "voc"
    make_synthetic_voc(root, num_train=40, num_test=2, image_size=64, seed=0)
    caplog.set_level(logging.WARNING, logger="edp_det.data.voc")
    VOCDataset(root, "trainval", image_cache=False)
    assert not [r for r in caplog.records if "misspelt" in r.message]
    ids = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    xml = root / "Annotations" / f"{ids[3]}.xml"
    tree = ET.parse(xml)
    tree.find("object/name").text = "cirlce"
    tree.write(xml)
    ds = VOCDataset(root, "trainval", image_cache=False)
    assert "cirlce" in ds.classes
    warned = [r.message for r in caplog.records if "misspelt" in r.message]
    assert len(warned) == 1 and "'cirlce' has 1 object(s)" in warned[0] and f"{ids[3]}.xml" in warned[0]
