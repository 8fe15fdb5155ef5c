"""Synthetic shape datasets in the VOC layout (for tests, demos and CPU benchmarks).

:func:`make_synthetic_voc` writes real JPEG images, VOC XML annotations and
``ImageSets/Main/{trainval,train,test}.txt`` directly under ``out`` (``out/Annotations``,
``out/JPEGImages``, ``out/ImageSets/Main``), readable with :class:`edp_det.data.voc.VOCDataset`.

The task is deliberately easy: 1-4 large (15-45 % of the image side), crisp, solid-coloured shapes
of clearly distinct classes on smooth textured backgrounds, with colours chosen to contrast with the
local background and little overlap (< 10 % of any object's area). About 10 % of the objects are
"difficult" (small and lower contrast) and about 10 % are truncated by the image border. Everything
is a pure function of ``seed`` (per-image RNG streams), so the same seed gives identical files.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from edp_det.runtime.errors import ConfigError

__all__ = ["SHAPES", "make_synthetic_voc", "render_background", "render_scene", "draw_shape_mask"]

#: Shape classes the generator can draw.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "hexagon")

DIFFICULT_PROB = 0.10
TRUNCATED_PROB = 0.10
JPEG_QUALITY = 95


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------
def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth textured background (low-frequency noise, stripes or gradient), HWC uint8."""
    kind = rng.integers(0, 3)
    base = rng.uniform(50, 205, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # smooth colour noise: upsampled coarse grid
        g = int(rng.integers(3, 7))
        coarse = np.clip(base + rng.normal(0, 28, size=(g, g, 3)), 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    elif kind == 1:  # soft stripes
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.25) * max(height, width)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period)
        t = (0.5 + 0.5 * np.sin(phase))[..., None]
        other = np.clip(base + rng.uniform(-45, 45, size=3), 0, 255)
        img = base * (1 - t) + other * t
    else:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(theta) + yy * math.sin(theta))
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
        other = np.clip(base + rng.uniform(-60, 60, size=3), 0, 255)
        img = base * (1 - t) + other * t
    img = img + rng.normal(0, rng.uniform(2, 5), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, radii: Sequence[float], angles: Sequence[float]) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def draw_shape_mask(
    shape: str, height: int, width: int, cx: float, cy: float, size: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask ``[height, width]`` of ``shape`` centred at (cx, cy) with extent ~``size`` px.

    The centre may lie outside the canvas (truncated shapes); only the visible part is drawn.
    """
    if shape not in SHAPES:
        raise ConfigError(f"synthetic shape={shape!r}: unknown (known: {', '.join(SHAPES)})")
    m = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(m)
    r = size / 2.0
    rot = rng.uniform(-math.pi / 16, math.pi / 16)
    if shape == "circle":
        a = rng.uniform(0.92, 1.08)
        d.ellipse([cx - r * a, cy - r / a, cx + r * a, cy + r / a], fill=255)
    elif shape == "square":
        a = rng.uniform(0.88, 1.12)
        hw, hh = r * a * 0.9, r / a * 0.9
        pts = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
    elif shape == "triangle":
        start = -math.pi / 2 + rng.uniform(-math.pi / 9, math.pi / 9) + (math.pi if rng.random() < 0.3 else 0.0)
        ang = [start + k * 2 * math.pi / 3 + rng.uniform(-0.08, 0.08) for k in range(3)]
        d.polygon(_polygon(cx, cy + 0.12 * r, [r * 1.12] * 3, ang), fill=255)
    elif shape == "diamond":
        a = rng.uniform(0.7, 0.85)
        d.polygon([(cx, cy - r), (cx + r * a, cy), (cx, cy + r), (cx - r * a, cy)], fill=255)
    elif shape == "cross":
        t = r * rng.uniform(0.28, 0.36)
        c, s = math.cos(rot), math.sin(rot)
        for pts in ([(-r, -t), (r, -t), (r, t), (-r, t)], [(-t, -r), (t, -r), (t, r), (-t, r)]):
            d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
    elif shape == "star":
        start = -math.pi / 2 + rot
        ang = [start + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
        d.polygon(_polygon(cx, cy, radii, ang), fill=255)
    elif shape == "hexagon":
        ang = [rot + k * math.pi / 3 for k in range(6)]
        d.polygon(_polygon(cx, cy, [r] * 6, ang), fill=255)
    return np.asarray(m) > 0


def _contrasting_colour(rng: np.random.Generator, ref: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A random RGB colour whose Euclidean distance to ``ref`` lies in [lo, hi] (best effort)."""
    best, best_gap = None, float("inf")
    for _ in range(200):
        c = rng.uniform(0, 255, size=3)
        dist = float(np.linalg.norm(c - ref))
        if lo <= dist <= hi:
            return c
        gap = lo - dist if dist < lo else dist - hi
        if gap < best_gap:
            best, best_gap = c, gap
    return best


def render_scene(
    rng: np.random.Generator,
    image_size: int,
    classes: Sequence[str],
    num_objects: int,
    size_range: tuple[float, float] = (0.15, 0.45),
    difficult_prob: float = DIFFICULT_PROB,
    truncated_prob: float = TRUNCATED_PROB,
    max_overlap: float = 0.10,
) -> tuple[np.ndarray, list[dict]]:
    """Draw up to ``num_objects`` shapes on a textured background.

    Returns the HWC uint8 image and objects ``{"name", "bbox" (VOC 1-based inclusive ints),
    "difficult", "truncated"}``; ``bbox`` is the tight box of the drawn pixels. Objects that cannot
    be placed within ``max_overlap`` of the others after some tries are left out (never the first).
    """
    H = W = int(image_size)
    img = render_background(rng, H, W).astype(np.float32)
    occupied = np.zeros((H, W), dtype=bool)
    masks: list[np.ndarray] = []
    objects: list[dict] = []
    for n in range(num_objects):
        for _attempt in range(40):
            name = str(classes[int(rng.integers(0, len(classes)))])
            difficult = bool(rng.random() < difficult_prob)
            truncated = (not difficult) and bool(rng.random() < truncated_prob)
            lo, hi = size_range
            frac = rng.uniform(lo, min(hi, lo + 0.05)) if difficult else rng.uniform(lo + 0.03, hi)
            size = frac * image_size
            r = size / 2
            if truncated:  # push the centre towards one border so 15-45 % of the shape is cut off
                cx, cy = rng.uniform(r, W - r), rng.uniform(r, H - r)
                off = r * rng.uniform(0.2, 0.7)
                side = int(rng.integers(0, 4))
                if side == 0:
                    cx = off
                elif side == 1:
                    cx = W - off
                elif side == 2:
                    cy = off
                else:
                    cy = H - off
            else:
                cx, cy = rng.uniform(r + 1, W - r - 1), rng.uniform(r + 1, H - r - 1)
            mask = draw_shape_mask(name, H, W, cx, cy, size, rng)
            area = int(mask.sum())
            if area < 0.5 * (0.10 * image_size) ** 2:
                continue
            inter = mask & occupied
            if inter.any():
                if inter.sum() > max_overlap * area:
                    continue
                if any((inter & m).sum() > max_overlap * m.sum() for m in masks):
                    continue
            # truncated = the shape is cut by the image border (whatever the placement intended)
            truncated = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            ys, xs = np.nonzero(mask)
            ref = img[ys, xs].mean(axis=0)
            colour = _contrasting_colour(rng, ref, 55, 85) if difficult else _contrasting_colour(rng, ref, 120, 330)
            shade = rng.normal(0, 3, size=(len(ys), 3))
            img[ys, xs] = np.clip(colour + shade, 0, 255)
            for m in masks:  # later objects cover earlier ones
                m &= ~mask
            masks.append(mask)
            occupied |= mask
            objects.append({"name": name, "difficult": difficult, "truncated": truncated})
            break
    # tight boxes of what is visible in the end (occlusion by later objects included)
    out_objects = []
    for obj, mask in zip(objects, masks):
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        obj["bbox"] = [int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1]
        out_objects.append(obj)
    return np.clip(img, 0, 255).astype(np.uint8), out_objects


# --------------------------------------------------------------------------------------------------
# VOC writer
# --------------------------------------------------------------------------------------------------
def _annotation_xml(filename: str, width: int, height: int, objects: list[dict]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synthetic"
    ET.SubElement(root, "filename").text = filename
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "edp-det synthetic shapes"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        ob = ET.SubElement(root, "object")
        ET.SubElement(ob, "name").text = o["name"]
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = str(int(o["truncated"]))
        ET.SubElement(ob, "difficult").text = str(int(o["difficult"]))
        bb = ET.SubElement(ob, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bbox"]):
            ET.SubElement(bb, k).text = str(int(v))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def make_synthetic_voc(
    out: str | Path,
    num_train: int,
    num_test: int,
    image_size: int = 256,
    seed: int = 0,
    classes: Sequence[str] = ("circle", "square", "triangle"),
) -> dict:
    """Write a synthetic VOC dataset under ``out`` and return a summary dict.

    Image ids are ``000000`` ... (train first, then test); split files ``trainval.txt``,
    ``train.txt`` (= trainval) and ``test.txt``. Image ``i`` of a split is drawn from its own RNG
    stream ``(seed, split, i)``, so results are deterministic and train images do not depend on
    ``num_test``. Existing files with the same names are overwritten.
    """
    classes = [str(c) for c in classes]
    bad = [c for c in classes if c not in SHAPES]
    if bad or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"synthetic classes={classes!r}: expected distinct names from {', '.join(SHAPES)}")
    for name, v, lo in (("num_train", num_train, 0), ("num_test", num_test, 0), ("image_size", image_size, 32)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"synthetic {name}={v!r}: expected an integer >= {lo}")
    if num_train + num_test == 0:
        raise ConfigError("synthetic num_train=0, num_test=0: nothing to write")
    out = Path(out)
    ann_dir, img_dir, set_dir = out / "Annotations", out / "JPEGImages", out / "ImageSets" / "Main"
    for d in (ann_dir, img_dir, set_dir):
        d.mkdir(parents=True, exist_ok=True)

    split_ids: dict[str, list[str]] = {"trainval": [], "test": []}
    stats = {"objects": 0, "difficult": 0, "truncated": 0}
    per_class = {c: 0 for c in classes}
    k = 0
    for split_code, (split, count) in enumerate((("trainval", num_train), ("test", num_test))):
        for i in range(count):
            rng = np.random.default_rng([int(seed), split_code, i])
            n_obj = int(rng.integers(1, 5))
            img, objects = render_scene(rng, image_size, classes, n_obj)
            image_id = f"{k:06d}"
            k += 1
            fname = f"{image_id}.jpg"
            Image.fromarray(img).save(img_dir / fname, quality=JPEG_QUALITY, subsampling=0)
            (ann_dir / f"{image_id}.xml").write_bytes(_annotation_xml(fname, image_size, image_size, objects))
            split_ids[split].append(image_id)
            stats["objects"] += len(objects)
            stats["difficult"] += sum(o["difficult"] for o in objects)
            stats["truncated"] += sum(o["truncated"] for o in objects)
            for o in objects:
                per_class[o["name"]] += 1
    for split, name in (("trainval", "trainval"), ("trainval", "train"), ("test", "test")):
        ids = split_ids[split]
        (set_dir / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return {
        "root": str(out),
        "classes": list(classes),
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
        "num_objects": stats["objects"],
        "num_difficult": stats["difficult"],
        "num_truncated": stats["truncated"],
        "objects_per_class": per_class,
    }
