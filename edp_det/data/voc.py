"""Pascal VOC reader with up-front validation of a whole split.

Layout (``root`` is either the folder holding the three sub-folders below, or a VOCdevkit folder
holding exactly one ``VOC*`` sub-folder such as ``VOCdevkit/VOC2007``)::

    root/Annotations/<id>.xml
    root/JPEGImages/<file>              # <filename> from the XML, falling back to <id>.jpg/.jpeg/.png
    root/ImageSets/Main/<split>.txt     # one image id per line

Box conventions (see DEVELOPERS.md): the XML holds VOC 1-based inclusive pixel boxes
``[xmin, ymin, xmax, ymax]``; targets handed to models hold torchvision continuous xyxy boxes
``[xmin - 1, ymin - 1, xmax, ymax]``. :func:`voc_to_xyxy` / :func:`xyxy_to_voc` convert.

Validation (:func:`validate_voc_split`) walks the whole split before training and returns every
:class:`Problem` at once instead of failing on the first bad sample in the middle of an epoch; every
image is fully decoded there (:mod:`edp_det.data.imagecheck`, verdicts cached). Images are used as
displayed (EXIF orientation applied by :func:`load_image`), so annotations must describe the displayed
image; see :func:`validate_voc_split` for the check of annotations made on the stored frame.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from edp_det.data import imagecheck
from edp_det.runtime.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "VOC07_CLASSES",
    "IMAGE_EXTENSIONS",
    "BOX_TOLERANCE",
    "MIN_BOX_SIDE",
    "Problem",
    "VOCRecord",
    "VOCDataset",
    "collate_fn",
    "collect_classes",
    "format_problems",
    "load_image",
    "parse_voc_xml",
    "apply_on_error",
    "read_split",
    "resolve_voc_root",
    "validate_voc_split",
    "voc_to_xyxy",
    "xyxy_to_voc",
]

VOC07_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

#: File extensions tried (in this order) when the XML ``<filename>`` is missing or absent on disk.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")

#: Boxes may exceed the image by this many pixels (VOC has a few at the border); they are clipped.
BOX_TOLERANCE = 1.0

#: Boxes narrower/shorter than this (pixels, continuous coordinates) after clipping/transforms are dropped.
MIN_BOX_SIDE = 1.0

SEVERITIES = ("error", "warning", "info")


# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One finding of a dataset validation.

    ``severity`` is ``"error"`` (the sample or object cannot be used), ``"warning"`` (usable but
    suspicious) or ``"info"``. ``object_index`` is set when the problem concerns a single object of
    the image (index of the ``<object>`` element in the XML); the rest of the image is then usable.
    """

    image_id: str | None
    file: str
    field: str
    value: Any
    message: str
    severity: str = "error"
    object_index: int | None = None

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.field}={self.value!r}: {self.message}"


def format_problems(problems: Sequence[Problem], limit: int = 20) -> str:
    """Render problems one per line (first ``limit``), followed by a count of the rest."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more problem(s)")
    return "\n".join(lines)


def apply_on_error(where: str, errors: Sequence[Problem], on_error: str, usable: bool, evaluation: bool = False,
                     skip_bad_eval_images: bool = False, what: str = "data") -> None:
    """Apply the ``on_error`` policy of a dataset to the error problems of one split.

    Raises :class:`DataError` listing the problems (first 20 and a count) with ``on_error="raise"``,
    when nothing is ``usable``, or for an ``evaluation`` split unless ``skip_bad_eval_images``
    (dropping evaluation images changes the benchmark). Otherwise logs one warning listing what is
    skipped. Does nothing when there are no errors.
    """
    if not errors:
        return
    n_img = sum(1 for p in errors if p.object_index is None)
    n_obj = len(errors) - n_img
    if on_error == "skip" and evaluation and not skip_bad_eval_images:
        raise DataError(
            f"{where}: {len(errors)} problem(s) in this evaluation split; on_error=skip does not drop evaluation "
            "images or boxes, since that changes the benchmark: fix the files, or opt in with "
            "data.skip_bad_eval_images=true to evaluate without them:\n" + format_problems(errors))
    if on_error == "raise" or not usable:
        hint = ""
        if on_error == "raise" and usable:
            hint = (" (on_error=skip with skip_bad_eval_images=true drops bad images/boxes)" if evaluation
                    else " (on_error=skip drops bad images/boxes)")
        raise DataError(f"{where}: {len(errors)} problem(s) in the {what}{hint}:\n" + format_problems(errors))
    logger.warning("%s: skipped %d image(s) and %d object(s) with errors (see dataset.skipped):\n%s",
                   where, n_img, n_obj, format_problems(errors))


# --------------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------------
def voc_to_xyxy(bbox: Sequence[float]) -> list[float]:
    """VOC 1-based inclusive ``[xmin, ymin, xmax, ymax]`` -> torchvision continuous xyxy."""
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    return [xmin - 1.0, ymin - 1.0, xmax, ymax]


def xyxy_to_voc(box: Sequence[float]) -> list[float]:
    """torchvision continuous xyxy -> VOC 1-based inclusive ``[xmin, ymin, xmax, ymax]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 + 1.0, y1 + 1.0, x2, y2]


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------
def resolve_voc_root(root: str | Path) -> Path:
    """Return the folder holding ``Annotations/`` (``root`` itself or its single ``VOC*`` child)."""
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataError(f"{p}: VOC root: directory not found")
    if (p / "Annotations").is_dir():
        return p
    subs = sorted(d for d in p.iterdir() if d.is_dir() and d.name.startswith("VOC") and (d / "Annotations").is_dir())
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        names = ", ".join(d.name for d in subs)
        raise DataError(f"{p}: VOC root: found several VOC* folders ({names}); pass one of them as root")
    raise DataError(
        f"{p}: VOC root: no Annotations/ folder here and no single VOC*/ sub-folder holding one "
        "(expected Annotations/, JPEGImages/, ImageSets/Main/)"
    )


def _split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Main" / f"{split}.txt"


def _available_splits(root: Path) -> list[str]:
    d = root / "ImageSets" / "Main"
    if not d.is_dir():
        return []
    return sorted(f.stem for f in d.glob("*.txt") if "_" not in f.stem)


def read_split(root: str | Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first token per line, duplicates removed)."""
    r = resolve_voc_root(root)
    f = _split_file(r, split)
    if not f.is_file():
        avail = ", ".join(_available_splits(r)) or "none"
        raise DataError(f"{f}: split={split!r}: split file not found (available splits: {avail})")
    ids: list[str] = []
    seen: set[str] = set()
    for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
        tok = line.strip().split()
        if not tok or tok[0].startswith("#"):
            continue
        if tok[0] not in seen:
            seen.add(tok[0])
            ids.append(tok[0])
    return ids


def _find_image(root: Path, image_id: str, filename: str | None) -> Path | None:
    img_dir = root / "JPEGImages"
    if filename:
        cand = img_dir / filename
        if cand.is_file():
            return cand
    for ext in IMAGE_EXTENSIONS:
        cand = img_dir / f"{image_id}{ext}"
        if cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------------------------------
# XML
# --------------------------------------------------------------------------------------------------
def _text(elem: ET.Element | None, tag: str) -> str | None:
    if elem is None:
        return None
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    t = child.text.strip()
    return t if t else None


def _parse(path: Path, image_id: str | None = None) -> tuple[dict | None, list[Problem]]:
    """Parse one annotation; returns (record or None if unusable, problems).

    Objects with a problem are left out of the record (their problems carry ``object_index``).
    """
    fpath = str(path)
    problems: list[Problem] = []

    def prob(fld, value, msg, severity="error", obj=None):
        problems.append(Problem(image_id, fpath, fld, value, msg, severity, obj))

    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        prob("xml", str(e), "malformed XML")
        return None, problems
    except OSError as e:
        prob("xml", str(path), f"cannot read annotation file: {e}")
        return None, problems
    root = tree.getroot()
    if root.tag != "annotation":
        prob("xml", root.tag, "root element must be <annotation>")
        return None, problems

    filename = _text(root, "filename")
    size = root.find("size")
    dims: dict[str, int] = {}
    for tag in ("width", "height"):
        raw = _text(size, tag)
        fld = f"size/{tag}"
        if raw is None:
            prob(fld, None, "missing field")
            continue
        try:
            v = float(raw)
        except ValueError:
            prob(fld, raw, "not a number")
            continue
        if not math.isfinite(v) or v <= 0 or v != round(v):
            prob(fld, raw, "must be a positive whole number of pixels")
            continue
        dims[tag] = int(round(v))
    depth = 3
    raw_depth = _text(size, "depth")
    if raw_depth is not None:
        try:
            depth = int(float(raw_depth))
        except ValueError:
            prob("size/depth", raw_depth, "not a number (ignored)", "warning")
    if len(dims) < 2:
        return None, problems

    objects: list[dict] = []
    for k, obj in enumerate(root.findall("object")):
        bad = False
        prefix = f"object[{k}]"
        name = _text(obj, "name")
        if name is None:
            prob(f"{prefix}/name", None, "missing class name", obj=k)
            bad = True
        flags = {}
        for tag in ("difficult", "truncated"):
            raw = _text(obj, tag)
            if raw is None:
                flags[tag] = False
                continue
            low = raw.lower()
            if low in ("true", "yes"):
                flags[tag] = True
            elif low in ("false", "no"):
                flags[tag] = False
            else:
                try:
                    flags[tag] = bool(int(float(raw)))
                except ValueError:
                    prob(f"{prefix}/{tag}", raw, "expected 0 or 1", obj=k)
                    bad = True
        bnd = obj.find("bndbox")
        coords: list[float] = []
        if bnd is None:
            prob(f"{prefix}/bndbox", None, "missing <bndbox>", obj=k)
            bad = True
        else:
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                raw = _text(bnd, tag)
                fld = f"{prefix}/bndbox/{tag}"
                if raw is None:
                    prob(fld, None, "missing coordinate", obj=k)
                    bad = True
                    continue
                try:
                    v = float(raw)
                except ValueError:
                    prob(fld, raw, "coordinate is not a number", obj=k)
                    bad = True
                    continue
                if not math.isfinite(v):
                    prob(fld, raw, "coordinate is not finite", obj=k)
                    bad = True
                    continue
                coords.append(v)
        if bad:
            continue
        objects.append(
            {
                "name": name,
                "bbox": coords,
                "difficult": flags["difficult"],
                "truncated": flags["truncated"],
                "index": k,
            }
        )
    record = {
        "filename": filename,
        "width": dims["width"],
        "height": dims["height"],
        "depth": depth,
        "objects": objects,
    }
    return record, problems


def parse_voc_xml(path: str | Path) -> dict:
    """Parse a VOC annotation file.

    Returns ``{"filename", "width", "height", "depth", "objects": [{"name", "bbox", "difficult",
    "truncated"}]}`` with ``bbox`` = VOC 1-based inclusive ``[xmin, ymin, xmax, ymax]`` floats.
    ``filename`` is ``None`` when the XML has none. Raises :class:`DataError` naming the file, the
    field and the value on malformed XML, missing fields or non-numeric values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation: file not found")
    record, problems = _parse(path, path.stem)
    errors = [p for p in problems if p.severity == "error"]
    if errors or record is None:
        raise DataError(f"{path}: invalid VOC annotation:\n" + format_problems(errors))
    for o in record["objects"]:
        del o["index"]
    return record


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """Load an image as RGB with its EXIF orientation applied. Raises :class:`DataError`."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    # composite on black rather than dropping alpha blindly (same result for opaque)
                    im = im.convert("RGBA")
                    bg = Image.new("RGB", im.size, (0, 0, 0))
                    bg.paste(im, mask=im.getchannel("A"))
                    im = bg
                else:
                    im = im.convert("RGB")
            else:
                im.load()
            return im
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"{path}: image: cannot read image ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
@dataclass
class VOCRecord:
    """A validated image: paths, size (after EXIF transposition when images were checked) and its
    usable objects (``{"name", "bbox" (VOC 1-based), "difficult", "truncated", "index"}``)."""

    image_id: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    objects: list[dict] = field(default_factory=list)


def validate_voc_split(
    root: str | Path,
    split: str,
    classes: Sequence[str] | None = None,
    check_images: bool = True,
    image_cache: str | Path | bool | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> tuple[list[VOCRecord], list[Problem]]:
    """Check a whole split; return the usable records and every problem found.

    Errors: missing/empty split file, missing annotation, malformed XML or missing/non-numeric
    fields, missing image, unreadable image, an EXIF-rotated image whose XML ``<size>`` is its
    stored (unrotated) frame (see below), degenerate box (xmax <= xmin or ymax <= ymin), box outside
    the image by more than :data:`BOX_TOLERANCE` pixels, unknown class name (only when ``classes``
    is given). Warnings: image size differing from the XML size otherwise, duplicate ids. Info:
    images without objects.

    With ``check_images`` every image is fully decoded up front by
    :func:`edp_det.data.imagecheck.check_images` (``workers`` threads, a progress bar unless
    ``show_progress=False``); verdicts are cached per (path, size, mtime) in
    ``imagecheck.image_cache_file(root, image_cache)`` (``image_cache=False``: no cache).

    EXIF convention: annotations describe the image *as displayed*, i.e. after its EXIF orientation
    is applied (what :func:`load_image` returns, and what CVAT, labelme, Roboflow and OpenCV use).
    An image rotated by 90/270 degrees whose XML size equals its stored frame (width and height
    swapped against the displayed image, as tools that ignore EXIF such as LabelImg write) is an
    image-level error naming the file and the fix. A 180-degree or mirrored orientation, or a square
    image, keeps the size and cannot be told apart: strip such tags before labelling.

    Records exclude images with an image-level error and objects with an object-level error.
    Boxes are compared with the real (displayed) image size when ``check_images`` (else the XML size).
    Raises :class:`DataError` only when ``root`` is not a VOC folder at all.
    """
    r = resolve_voc_root(root)
    known = None if classes is None else set(classes)
    problems: list[Problem] = []
    records: list[VOCRecord] = []

    sfile = _split_file(r, split)
    if not sfile.is_file():
        avail = ", ".join(_available_splits(r)) or "none"
        problems.append(Problem(None, str(sfile), "split", split, f"split file not found (available splits: {avail})"))
        return records, problems
    if not (r / "JPEGImages").is_dir():
        problems.append(Problem(None, str(r / "JPEGImages"), "JPEGImages", None, "image folder not found"))
        return records, problems

    raw_lines = [ln.split()[0] for ln in sfile.read_text(encoding="utf-8", errors="replace").splitlines() if ln.split()]
    raw_lines = [t for t in raw_lines if not t.startswith("#")]
    ids = read_split(r, split)
    if len(raw_lines) != len(ids):
        dups = sorted({t for t in raw_lines if raw_lines.count(t) > 1})
        problems.append(
            Problem(None, str(sfile), "split", dups[:10], f"{len(raw_lines) - len(ids)} duplicate id(s) ignored", "warning")
        )
    if not ids:
        problems.append(Problem(None, str(sfile), "split", split, "split file lists no image ids"))
        return records, problems

    # pass 1: annotations and image paths; pass 2 (after decoding every image at once): sizes and boxes
    entries: list[tuple[str, list[Problem], dict | None, Path, Path | None]] = []
    for image_id in ids:
        ann = r / "Annotations" / f"{image_id}.xml"
        if not ann.is_file():
            entries.append((image_id, [Problem(image_id, str(ann), "annotation", image_id, "annotation file not found")],
                            None, ann, None))
            continue
        rec, probs = _parse(ann, image_id)
        img_path = None if rec is None else _find_image(r, image_id, rec["filename"])
        if rec is not None and img_path is None:
            wanted = rec["filename"] or f"{image_id}.jpg"
            probs.append(
                Problem(image_id, str(r / "JPEGImages" / wanted), "image", wanted,
                        f"image file not found (annotation {ann.name}; also tried {image_id} + {'/'.join(IMAGE_EXTENSIONS[:3])})")
            )
        entries.append((image_id, probs, rec, ann, img_path))
    infos = {}
    if check_images:
        infos = imagecheck.check_images([e[4] for e in entries if e[4] is not None],
                                        cache_file=imagecheck.image_cache_file(r, image_cache), workers=workers,
                                        desc=f"checking images of split {split!r}", show_progress=show_progress).infos

    for image_id, probs, rec, ann, img_path in entries:
        problems.extend(probs)
        if rec is None or img_path is None:
            continue
        width, height = rec["width"], rec["height"]
        if check_images:
            info = infos[str(img_path)]
            if not info.ok:
                problems.append(Problem(image_id, str(img_path), "image", img_path.name, f"unreadable image ({info.error})"))
                continue
            w, h = info.display_size
            if (w, h) != (width, height) and info.orientation in imagecheck.TRANSPOSING_ORIENTATIONS \
                    and (info.width, info.height) == (width, height):
                problems.append(
                    Problem(image_id, str(img_path), "size", f"{width}x{height}",
                            f"the XML size in {ann.name} is the stored (unrotated) frame, but the image carries EXIF "
                            f"orientation {info.orientation} and is used as displayed ({w}x{h}), so the boxes would "
                            "land on the wrong pixels (annotation tools that ignore EXIF write this, e.g. LabelImg): "
                            "clear the tag without rotating the pixels (exiftool -n -Orientation=1 FILE) or re-export "
                            "the annotation on the displayed image")
                )
                continue
            if (w, h) != (width, height):
                problems.append(
                    Problem(image_id, str(ann), "size", f"{width}x{height}",
                            f"XML size differs from the image on disk ({w}x{h}, after EXIF orientation); using the image size",
                            "warning")
                )
                width, height = w, h
        good: list[dict] = []
        for o in rec["objects"]:
            k = o["index"]
            prefix = f"object[{k}]"
            if known is not None and o["name"] not in known:
                problems.append(Problem(image_id, str(ann), f"{prefix}/name", o["name"],
                                        f"unknown class name (not among the {len(known)} given classes)", "error", k))
                continue
            xmin, ymin, xmax, ymax = o["bbox"]
            if xmax <= xmin or ymax <= ymin:
                problems.append(Problem(image_id, str(ann), f"{prefix}/bndbox", o["bbox"],
                                        "degenerate box (needs xmax > xmin and ymax > ymin)", "error", k))
                continue
            tol = BOX_TOLERANCE
            if xmin < 1 - tol or ymin < 1 - tol or xmax > width + tol or ymax > height + tol:
                problems.append(Problem(image_id, str(ann), f"{prefix}/bndbox", o["bbox"],
                                        f"box outside the {width}x{height} image (by more than {tol:g} px)", "error", k))
                continue
            x1, y1, x2, y2 = voc_to_xyxy(o["bbox"])
            x1, x2 = max(x1, 0.0), min(x2, float(width))
            y1, y2 = max(y1, 0.0), min(y2, float(height))
            if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
                problems.append(Problem(image_id, str(ann), f"{prefix}/bndbox", o["bbox"],
                                        "degenerate box after clipping to the image", "error", k))
                continue
            good.append(o)
        if not rec["objects"]:
            problems.append(Problem(image_id, str(ann), "object", 0, "image has no objects (used as background only)", "info"))
        records.append(VOCRecord(image_id, img_path, ann, width, height, good))
    return records, problems


def collect_classes(root: str | Path, split: str) -> list[str]:
    """Sorted class names found in the split's (parseable) annotations."""
    r = resolve_voc_root(root)
    names: set[str] = set()
    for image_id in read_split(r, split):
        ann = r / "Annotations" / f"{image_id}.xml"
        if not ann.is_file():
            continue
        rec, _ = _parse(ann, image_id)
        if rec is not None:
            names.update(o["name"] for o in rec["objects"])
    return sorted(names)


# --------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------
#: a class collected from the annotations with at most this many objects, where the median class has at least
#: RARE_CLASS_MEDIAN, is reported as a probable typo
RARE_CLASS_OBJECTS = 2
RARE_CLASS_MEDIAN = 20


def _warn_rare_classes(where: str, records: list[VOCRecord]) -> None:
    """WARNING for classes that only a few objects of a split carry while the others have many (e.g. ``racoon`` in
    one XML among hundreds of ``raccoon``): collected from the annotations, such a name becomes a class of its own."""
    files: dict[str, list[str]] = {}
    for rec in records:
        for o in rec.objects:
            files.setdefault(o["name"], []).append(rec.annotation_path.name)
    counts = sorted(len(v) for v in files.values())
    median = counts[len(counts) // 2]
    if len(counts) < 2 or median < RARE_CLASS_MEDIAN:
        return
    for name, where_seen in sorted(files.items()):
        if len(where_seen) <= RARE_CLASS_OBJECTS:
            logger.warning("%s: object/name: class %r has %d object(s) (%s), the median class %d: a misspelt name? "
                           "(data.classes lists the classes and makes any other name an error)", where, name,
                           len(where_seen), ", ".join(sorted(set(where_seen))[:3]), median)


class VOCDataset(torch.utils.data.Dataset):
    """A validated VOC split for torchvision detectors.

    ``__getitem__`` returns ``(image, target)``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``;
    ``target`` = ``{"boxes": float32 [N, 4] continuous xyxy, "labels": int64 [N] in 1..C,
    "difficult": bool [N], "image_id": str, "orig_size": (H, W)}`` where ``orig_size`` is the size
    of the loaded (EXIF-transposed) image before ``transforms``.

    The whole split is validated on construction (:func:`validate_voc_split`).

    * ``on_error="raise"``: any error-severity problem raises :class:`DataError` listing them all
      (first 20 plus a count), each with file and field.
    * ``on_error="skip"``: an image-level problem (missing/unreadable image or annotation, malformed
      XML, bad size) drops the image; an object-level problem (degenerate/out-of-image box, unknown
      class, bad field in one ``<object>``) drops only that object and keeps the rest of the image.
      ``self.skipped`` lists the error problems that caused drops; one warning lists them.
    * ``evaluation=True`` marks a split used for evaluation: dropping its images or boxes changes
      the benchmark, so ``on_error="skip"`` raises like ``"raise"`` unless ``skip_bad_eval_images``.

    A training split (``evaluation=False``) whose objects are all difficult while
    ``use_difficult=False`` raises :class:`DataError` (no positive would be left to train on).
    ``image_cache`` selects the cache of the image checks (see :func:`validate_voc_split`).

    ``classes=None`` collects the class names present in the split (sorted). Label ``i + 1`` is
    ``classes[i]``. With ``use_difficult=False`` difficult objects are left out of training targets
    (but kept in :meth:`annotations`, for evaluation). Boxes within the tolerance outside the image
    are clipped; boxes thinner than :data:`MIN_BOX_SIDE` px after transforms are removed with their
    labels and difficult flags.

    ``transforms`` is called as ``transforms(image=HWC uint8 ndarray, bboxes=float32 [N, 4] xyxy,
    labels=..., difficult=...)`` and must return a dict with the same keys (an albumentations
    ``Compose`` from :func:`edp_det.data.transforms.build_transforms` does).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: Sequence[str] | None = None,
        use_difficult: bool = False,
        transforms: Callable | None = None,
        on_error: str = "raise",
        check_images: bool = True,
        evaluation: bool = False,
        skip_bad_eval_images: bool = False,
        image_cache: str | Path | bool | None = None,
    ):
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"VOCDataset: on_error={on_error!r}: must be 'raise' or 'skip'")
        if classes is not None:
            classes = [str(c) for c in classes]
            if not classes:
                raise ConfigError("VOCDataset: classes=[]: need at least one class name")
            dup = sorted({c for c in classes if classes.count(c) > 1})
            if dup:
                raise ConfigError(f"VOCDataset: classes={dup!r}: duplicate class names")
        self.root = resolve_voc_root(root)
        self.split = split
        self.use_difficult = bool(use_difficult)
        self.transforms = transforms
        records, problems = validate_voc_split(self.root, split, classes, check_images, image_cache=image_cache)
        self.problems: list[Problem] = problems
        errors = [p for p in problems if p.severity == "error"]
        where = f"{self.root} split {split!r}"
        apply_on_error(where, errors, on_error, bool(records), evaluation, skip_bad_eval_images, "VOC data")
        warnings = [p for p in problems if p.severity == "warning"]
        for p in warnings[:20]:
            logger.warning("%s", p)
        if len(warnings) > 20:
            logger.warning("... and %d more warning(s)", len(warnings) - 20)
        self.skipped: list[Problem] = errors
        if not records:
            raise DataError(f"{where}: split: no usable images")
        if classes is None:
            classes = sorted({o["name"] for rec in records for o in rec.objects})
            if not classes:
                raise DataError(f"{where}: object/name: no objects in the split, cannot infer classes")
            _warn_rare_classes(where, records)
        if not evaluation and not self.use_difficult:
            n_obj = sum(len(rec.objects) for rec in records)
            if n_obj and not any(not o["difficult"] for rec in records for o in rec.objects):
                raise DataError(
                    f"{where}: object/difficult: all {n_obj} object(s) of this training split are marked difficult, "
                    "so with use_difficult=false there is nothing to learn (set data.use_difficult=true, fix the "
                    "<difficult> flags, or use another split)")
        self.classes: list[str] = list(classes)
        self.class_to_label = {c: i + 1 for i, c in enumerate(self.classes)}
        self.records: list[VOCRecord] = records

    # ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of object classes C (labels 1..C; background 0 not counted)."""
        return len(self.classes)

    @property
    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.classes)}, skipped={len(self.skipped)})")

    def annotations(self) -> dict[str, list[dict]]:
        """``image_id -> [{"category", "bbox" (VOC 1-based), "difficult"}]`` for every image,
        including difficult objects (for the VOC evaluator)."""
        return {
            rec.image_id: [
                {"category": o["name"], "bbox": [float(v) for v in o["bbox"]], "difficult": bool(o["difficult"])}
                for o in rec.objects
            ]
            for rec in self.records
        }

    def get_target_arrays(self, index: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (continuous xyxy, clipped to ``width`` x ``height``), labels and difficult flags."""
        rec = self.records[index]
        objs = [o for o in rec.objects if self.use_difficult or not o["difficult"]]
        boxes = np.asarray([voc_to_xyxy(o["bbox"]) for o in objs], dtype=np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        labels = np.asarray([self.class_to_label[o["name"]] for o in objs], dtype=np.int64)
        difficult = np.asarray([bool(o["difficult"]) for o in objs], dtype=bool)
        return boxes, labels, difficult

    def __getitem__(self, index: int):
        rec = self.records[index]
        img = load_image(rec.image_path)
        width, height = img.size
        boxes, labels, difficult = self.get_target_arrays(index, width, height)
        arr = np.array(img, dtype=np.uint8)  # writable copy
        if self.transforms is not None:
            out = self.transforms(image=arr, bboxes=boxes, labels=labels.tolist(), difficult=difficult.tolist())
            arr = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            difficult = np.asarray(out["difficult"], dtype=bool).reshape(-1)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
        boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "difficult": torch.from_numpy(np.ascontiguousarray(difficult, dtype=bool)),
            "image_id": rec.image_id,
            "orig_size": (height, width),
        }
        return image, target


def collate_fn(batch):
    """DataLoader collate for detection: ``[(img, tgt), ...] -> ([img, ...], [tgt, ...])``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
