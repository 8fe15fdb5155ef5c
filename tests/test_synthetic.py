"""Synthetic VOC generator (edp_det.data.synthetic) and its CLI."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from edp_det.data.synthetic import make_synthetic_voc, render_background, render_scene
from edp_det.data.voc import VOCDataset, validate_voc_split
from edp_det.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def all_objects(root: Path) -> list[ET.Element]:
    return [o for f in sorted((root / "Annotations").glob("*.xml")) for o in ET.parse(f).getroot().findall("object")]


def test_same_seed_identical_files(tmp_path):
    a = make_synthetic_voc(tmp_path / "a", 4, 2, image_size=96, seed=7)
    make_synthetic_voc(tmp_path / "b", 4, 2, image_size=96, seed=7)
    make_synthetic_voc(tmp_path / "c", 4, 2, image_size=96, seed=8)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 + 6 + 3  # xml + jpg + trainval/train/test
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    xml_a = [(tmp_path / "a/Annotations" / f"{i:06d}.xml").read_bytes() for i in range(6)]
    xml_c = [(tmp_path / "c/Annotations" / f"{i:06d}.xml").read_bytes() for i in range(6)]
    assert xml_a != xml_c
    assert a["num_objects"] == len(all_objects(tmp_path / "a"))


def test_train_images_do_not_depend_on_num_test(tmp_path):
    make_synthetic_voc(tmp_path / "a", 3, 1, image_size=64, seed=0)
    make_synthetic_voc(tmp_path / "b", 3, 4, image_size=64, seed=0)
    for i in range(3):
        assert (tmp_path / f"a/Annotations/{i:06d}.xml").read_bytes() == (tmp_path / f"b/Annotations/{i:06d}.xml").read_bytes()
    assert (tmp_path / "a/ImageSets/Main/trainval.txt").read_text() == "000000\n000001\n000002\n"
    assert (tmp_path / "b/ImageSets/Main/test.txt").read_text().split() == ["000003", "000004", "000005", "000006"]


def test_dataset_statistics_and_validity(tmp_path):
    s = make_synthetic_voc(tmp_path / "d", 40, 10, image_size=96, seed=3)
    records, problems = validate_voc_split(tmp_path / "d", "trainval", classes=("circle", "square", "triangle"))
    assert [p for p in problems if p.severity != "info"] == [] and len(records) == 40
    objs = all_objects(tmp_path / "d")
    n = len(objs)
    n_diff = sum(o.findtext("difficult") == "1" for o in objs)
    n_trunc = sum(o.findtext("truncated") == "1" for o in objs)
    assert (s["num_objects"], s["num_difficult"], s["num_truncated"]) == (n, n_diff, n_trunc)
    assert 50 * 1 <= n <= 50 * 4
    assert 0.03 <= n_diff / n <= 0.25, (n_diff, n)
    assert 0.02 <= n_trunc / n <= 0.35, (n_trunc, n)
    assert set(s["objects_per_class"]) == {"circle", "square", "triangle"} and min(s["objects_per_class"].values()) > 0
    for o in objs:
        b = [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        assert 1 <= b[0] < b[2] <= 96 and 1 <= b[1] < b[3] <= 96
        side = max(b[2] - b[0] + 1, b[3] - b[1] + 1) / 96
        if o.findtext("truncated") == "0":
            assert 0.10 <= side <= 0.60, (b, side)
        if o.findtext("truncated") == "1":
            assert b[0] == 1 or b[1] == 1 or b[2] == 96 or b[3] == 96
    ds = VOCDataset(tmp_path / "d", "test")
    assert ds.classes == ["circle", "square", "triangle"] and len(ds) == 10


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_boxes_are_tight_around_drawn_pixels(seed):
    # render_scene draws its background first from the same RNG stream: re-create it to find the object pixels
    img, objs = render_scene(np.random.default_rng(seed), 128, ["circle", "square", "triangle"], 1,
                             difficult_prob=0.0, truncated_prob=0.0)
    bg = render_background(np.random.default_rng(seed), 128, 128)
    changed = np.abs(img.astype(int) - bg.astype(int)).max(axis=-1) > 40
    ys, xs = np.nonzero(changed)
    assert len(objs) == 1 and len(xs) > 0.01 * 128 * 128
    # VOC 1-based inclusive box of the drawn pixels
    assert objs[0]["bbox"] == [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"classes=\['blob'\]"):
        make_synthetic_voc(tmp_path, 1, 1, classes=("blob",))
    with pytest.raises(ConfigError, match="num_train=-1"):
        make_synthetic_voc(tmp_path, -1, 1)


def test_cli(tmp_path, capsys):
    tool = load_tool("make_synthetic_voc")
    args = tool.get_args_parser().parse_args(
        ["--out", str(tmp_path / "cli"), "--num-train", "2", "--num-test", "1", "--image-size", "64", "--seed", "3"])
    summary = tool.main(args)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "wrote 2 trainval + 1 test images" in out
    assert summary["num_train"] == 2 and len(list((tmp_path / "cli/JPEGImages").glob("*.jpg"))) == 3
    bad = tool.get_args_parser().parse_args(["--out", str(tmp_path / "x"), "--num-train", "1", "--num-test", "1",
                                             "--classes", "blob"])
    from edp_det.harness.cli import cli_main

    with pytest.raises(SystemExit) as ei:
        cli_main(tool.main, bad, "make_synthetic_voc")
    assert ei.value.code == 2 and "blob" in capsys.readouterr().err
