"""PASCAL VOC detection evaluation (VOC2007 protocol, py-faster-rcnn conventions).

This module re-implements, in vectorised numpy, the evaluation rules of the reference VOC2007 evaluator that
published Faster R-CNN numbers were computed with (``voc_eval`` in py-faster-rcnn, itself a port of the official
VOCdevkit MATLAB code). The conventions, all of which the unit tests in ``tests/test_voc_eval.py`` pin down:

Boxes
    Detections and ground truth are VOC 1-based *inclusive* pixel boxes ``[xmin, ymin, xmax, ymax]`` (the
    ``detections.json`` / VOC XML convention; a torchvision box ``x1, y1, x2, y2`` converts as ``xmin = x1 + 1,
    ymin = y1 + 1, xmax = x2, ymax = y2``). With ``pixel_plus_one=True`` (default, the reference behaviour) a box
    spans ``xmax - xmin + 1`` pixels in width and ``ymax - ymin + 1`` in height, and the intersection width is
    ``min(xmax) - max(xmin) + 1`` clipped at 0. ``pixel_plus_one=False`` treats boxes as continuous (no ``+1``).

Matching (per class, independently)
    1. All detections of the class, over all images, are sorted by descending score. The sort is *stable*, so equal
       scores keep their input order (the reference uses an unstable ``argsort``; results only differ on exact ties).
    2. Each detection is compared only with the ground-truth boxes of the same class **in the same image** and is
       assigned to the single GT with the highest IoU (first such GT on exact IoU ties), whether or not that GT is
       difficult or already matched. It is never re-assigned to a second-best GT.
    3. If that IoU is **strictly greater** than ``iou_thresh`` (default 0.5; a detection with IoU exactly 0.5 is a
       miss):
         - GT marked ``difficult``: the detection is *ignored* (neither TP nor FP);
         - GT not matched yet: TP, and the GT becomes matched;
         - GT already matched by a higher-scored detection (duplicate): FP.
       Otherwise (IoU <= threshold, or no GT of the class in the image): FP.
    4. The number of positives of a class is its number of **non-difficult** GT boxes.

Precision / recall
    Cumulative TP/FP over the sorted detections: ``recall = tp / num_pos``, ``precision = tp / max(tp + fp, eps)``.

AP variants (both are always computed)
    ``ap_voc07``: 11-point interpolated AP, the official VOC2007 metric:
        ``mean over t in {0, 0.1, ..., 1.0} of max(precision[recall >= t])`` (0 if no point has recall >= t).
        The thresholds are exactly ``k / 10``. (The reference builds them with ``np.arange(0, 1.1, 0.1)``, whose
        entries 0.3, 0.6 and 0.7 are one ulp above ``k / 10``; the two differ only when a recall lands exactly on
        3/10, 6/10 or 7/10 of the positives *and* that point carries the maximum precision.)
    ``ap_area``: all-point AP (VOC2010+ style): area under the precision envelope, where precision is first made
        monotonically non-increasing in recall (``p(r) = max_{r' >= r} p(r')``) and summed over the recall steps.

Edge cases
    - A class with **no non-difficult GT** (num_pos = 0): recall is undefined (the reference divides by zero and
      silently reports AP 0 under the 11-point rule). Here its APs are reported as ``None`` (``null`` in JSON) and the
      class is **excluded from the mAP**; ``num_gt`` = 0 makes the reason visible.
    - A class with GT but no detections: AP = 0 (included in the mAP).
    - mAP is the unweighted mean over the classes with AP defined; ``None`` if no class has positives.
    - Ground truth of categories not in ``classes`` is ignored; detections of such categories are an error.
    - Degenerate boxes: areas use widths/heights clipped at 0 and a zero union gives IoU 0 (the reference would
      divide by zero); for valid boxes this is identical.

Example::

    res = evaluate_voc(load_detections_json("detections.json", classes), dataset.annotations(), dataset.classes)
    print(res.format_table()); json.dump(res.to_dict(), f)
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from edp_det.runtime.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["VOCResult", "evaluate_voc", "load_detections_json", "voc_ap_11point", "voc_ap_area", "box_iou_voc"]

# Max number of (detection, GT) IoU entries computed at once (bounds memory for huge detection lists).
_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------------------------------
# AP from a PR curve
# --------------------------------------------------------------------------------------------------------------------
def voc_ap_11point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP: mean over t = 0, 0.1, ..., 1 of max(precision[recall >= t]) (0 if none)."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.size == 0:
        return 0.0
    thresholds = np.arange(11, dtype=np.float64) / 10.0
    # envelope from the right: max precision among points with index >= i; recall is non-decreasing, so the points
    # with recall >= t are a suffix and max(precision[recall >= t]) = env[first index with recall >= t].
    env = np.maximum.accumulate(precision[::-1])[::-1]
    first = np.searchsorted(recall, thresholds, side="left")
    vals = np.where(first < recall.size, env[np.minimum(first, recall.size - 1)], 0.0)
    return float(vals.sum() / 11.0)


def voc_ap_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point AP: area under the monotone (non-increasing) precision envelope of the PR curve."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.size == 0:
        return 0.0
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# --------------------------------------------------------------------------------------------------------------------
# IoU
# --------------------------------------------------------------------------------------------------------------------
def box_iou_voc(a: np.ndarray, b: np.ndarray, pixel_plus_one: bool = True) -> np.ndarray:
    """Element-wise IoU of boxes ``a[..., 4]`` and ``b[..., 4]`` (broadcasting) under the VOC pixel convention."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    one = 1.0 if pixel_plus_one else 0.0
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area_a = np.clip(a[..., 2] - a[..., 0] + one, 0.0, None) * np.clip(a[..., 3] - a[..., 1] + one, 0.0, None)
    area_b = np.clip(b[..., 2] - b[..., 0] + one, 0.0, None) * np.clip(b[..., 3] - b[..., 1] + one, 0.0, None)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


# --------------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------------
def _none_if_nan(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class VOCResult:
    """Per-class and mean VOC AP. APs are ``None`` for classes without non-difficult ground truth."""

    classes: list[str]
    iou_thresh: float
    ap_voc07: dict[str, float | None]
    ap_area: dict[str, float | None]
    num_gt: dict[str, int]  # non-difficult GT boxes (the positives)
    num_difficult: dict[str, int]
    num_det: dict[str, int]
    mAP_voc07: float | None
    mAP_area: float | None
    recall: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    precision: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: mAP_voc07, mAP_area, ap_per_class {cls: {ap_voc07, ap_area, num_gt, num_det, ...}}."""
        return {
            "mAP_voc07": _none_if_nan(self.mAP_voc07),
            "mAP_area": _none_if_nan(self.mAP_area),
            "ap_per_class": {
                c: {
                    "ap_voc07": _none_if_nan(self.ap_voc07[c]),
                    "ap_area": _none_if_nan(self.ap_area[c]),
                    "num_gt": int(self.num_gt[c]),
                    "num_difficult": int(self.num_difficult[c]),
                    "num_det": int(self.num_det[c]),
                }
                for c in self.classes
            },
            "iou_thresh": float(self.iou_thresh),
        }

    def format_table(self) -> str:
        """Printable per-class table (APs as fractions; '-' where undefined)."""

        def fmt(v: float | None) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

        width = max([len("class"), len("mAP")] + [len(c) for c in self.classes])
        header = f"{'class':<{width}}  {'num_gt':>7}  {'num_det':>8}  {'AP(voc07)':>9}  {'AP(area)':>9}"
        lines = [f"VOC evaluation @ IoU > {self.iou_thresh:g}", header, "-" * len(header)]
        for c in self.classes:
            lines.append(
                f"{c:<{width}}  {self.num_gt[c]:>7d}  {self.num_det[c]:>8d}  "
                f"{fmt(self.ap_voc07[c]):>9}  {fmt(self.ap_area[c]):>9}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'mAP':<{width}}  {sum(self.num_gt.values()):>7d}  {sum(self.num_det.values()):>8d}  "
            f"{fmt(self.mAP_voc07):>9}  {fmt(self.mAP_area):>9}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
def _max_iou_per_det(
    det_boxes: np.ndarray, det_img: np.ndarray, gt_boxes: np.ndarray, gt_img: np.ndarray, num_images: int,
    pixel_plus_one: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection: (highest IoU with a same-image GT, global index of that GT or -1).

    GT boxes are laid out in a padded [num_images, M, 4] table (M = max GT per image), so each detection is compared
    with exactly the M slots of its own image in one broadcast; padded slots get IoU -inf.
    """
    n_det = det_boxes.shape[0]
    ovmax = np.full(n_det, -np.inf)
    jmax = np.full(n_det, -1, dtype=np.int64)
    if n_det == 0 or gt_boxes.shape[0] == 0:
        return ovmax, jmax
    order = np.argsort(gt_img, kind="stable")  # GT sorted by image, original order within an image
    counts = np.bincount(gt_img, minlength=num_images)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(order.size) - starts[gt_img[order]]
    m = int(counts.max())
    table = np.zeros((num_images, m, 4), dtype=np.float64)
    valid = np.zeros((num_images, m), dtype=bool)
    index = np.full((num_images, m), -1, dtype=np.int64)
    table[gt_img[order], slot] = gt_boxes[order]
    valid[gt_img[order], slot] = True
    index[gt_img[order], slot] = order
    chunk = max(1, _CHUNK_ELEMS // m)
    for s in range(0, n_det, chunk):
        e = min(n_det, s + chunk)
        imgs = det_img[s:e]
        iou = box_iou_voc(det_boxes[s:e, None, :], table[imgs], pixel_plus_one)  # [d, M]
        iou = np.where(valid[imgs], iou, -np.inf)
        best = np.argmax(iou, axis=1)  # first maximum on ties, like the reference
        rows = np.arange(e - s)
        ovmax[s:e] = iou[rows, best]
        jmax[s:e] = np.where(np.isfinite(ovmax[s:e]), index[imgs, best], -1)
    return ovmax, jmax


def _evaluate_class(
    det_img: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray,
    gt_img: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
    num_images: int, iou_thresh: float, pixel_plus_one: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (recall, precision, num_pos) for one class. Ignored detections do not appear in the curve."""
    num_pos = int(np.count_nonzero(~gt_difficult))
    order = np.argsort(-det_scores, kind="stable")
    det_img, det_boxes = det_img[order], det_boxes[order]
    ovmax, jmax = _max_iou_per_det(det_boxes, det_img, gt_boxes, gt_img, num_images, pixel_plus_one)

    hit = ovmax > iou_thresh  # strictly greater
    hit_difficult = hit & gt_difficult[np.maximum(jmax, 0)] if gt_boxes.shape[0] else np.zeros_like(hit)
    # Greedy matching in score order: the first (highest-scored) detection assigned to a non-difficult GT with IoU
    # above the threshold is the TP; later ones assigned to the same GT are duplicates (FP). Since each detection's
    # GT is fixed (its best-IoU GT), "first in sorted order per GT" is exactly the sequential greedy result.
    cand = np.nonzero(hit & ~hit_difficult)[0]
    tp = np.zeros(det_img.size, dtype=np.float64)
    if cand.size:
        _, first = np.unique(jmax[cand], return_index=True)
        tp[cand[first]] = 1.0
    fp = np.where(hit_difficult, 0.0, 1.0 - tp)
    keep = ~hit_difficult  # ignored detections contribute neither TP nor FP
    tp_c = np.cumsum(tp[keep])
    fp_c = np.cumsum(fp[keep])
    if num_pos > 0:
        recall = tp_c / float(num_pos)
    else:
        recall = np.full(tp_c.shape, np.nan)
    precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
    return recall, precision, num_pos


def evaluate_voc(
    detections: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, Sequence[Mapping[str, Any]]],
    classes: Sequence[str],
    iou_thresh: float = 0.5,
    pixel_plus_one: bool = True,
) -> VOCResult:
    """VOC AP per class and mAP (see the module docstring for the exact rules).

    Args:
        detections: list of ``{"image_id": str, "category": str, "bbox": [xmin, ymin, xmax, ymax], "score": float}``
            (VOC 1-based inclusive boxes), e.g. from :func:`load_detections_json`.
        annotations: ``image_id -> [{"category": str, "bbox": [xmin, ymin, xmax, ymax], "difficult": bool}, ...]``
            for every image of the split (images without objects included, with an empty list).
        classes: class names to evaluate (order of the report).
        iou_thresh: a detection is a hit when IoU > iou_thresh (strictly); 0 < iou_thresh < 1.
        pixel_plus_one: VOC pixel convention (width = xmax - xmin + 1).

    Raises:
        DataError: a detection references an image not in ``annotations`` or a category not in ``classes``.
    """
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise DataError(f"evaluate_voc: duplicate class names in classes={classes!r}")
    if not (0.0 < float(iou_thresh) < 1.0):
        raise DataError(f"evaluate_voc: iou_thresh must be > 0 and < 1, got {iou_thresh!r}")
    cls_index = {c: i for i, c in enumerate(classes)}
    image_ids = list(annotations.keys())
    img_index = {img: i for i, img in enumerate(image_ids)}
    num_images = len(image_ids)

    # ---- ground truth -> flat arrays
    g_img, g_cls, g_box, g_diff = [], [], [], []
    for img, objs in annotations.items():
        ii = img_index[img]
        for obj in objs:
            ci = cls_index.get(obj["category"])
            if ci is None:
                continue
            g_img.append(ii)
            g_cls.append(ci)
            g_box.append([float(v) for v in obj["bbox"]])
            g_diff.append(bool(obj.get("difficult", False)))
    g_img_a = np.asarray(g_img, dtype=np.int64)
    g_cls_a = np.asarray(g_cls, dtype=np.int64)
    g_box_a = np.asarray(g_box, dtype=np.float64).reshape(-1, 4)
    g_diff_a = np.asarray(g_diff, dtype=bool)

    # ---- detections -> flat arrays
    n = len(detections)
    d_img = np.empty(n, dtype=np.int64)
    d_cls = np.empty(n, dtype=np.int64)
    d_box = np.empty((n, 4), dtype=np.float64)
    d_score = np.empty(n, dtype=np.float64)
    for k, det in enumerate(detections):
        ii = img_index.get(det["image_id"])
        if ii is None:
            raise DataError(f"detections[{k}].image_id={det['image_id']!r} is not an image of the evaluated split")
        ci = cls_index.get(det["category"])
        if ci is None:
            raise DataError(f"detections[{k}].category={det['category']!r} is not one of the classes {classes}")
        d_img[k], d_cls[k] = ii, ci
        d_box[k] = det["bbox"]
        d_score[k] = det["score"]

    ap07: dict[str, float | None] = {}
    aparea: dict[str, float | None] = {}
    num_gt: dict[str, int] = {}
    num_diff: dict[str, int] = {}
    num_det: dict[str, int] = {}
    recalls: dict[str, np.ndarray] = {}
    precisions: dict[str, np.ndarray] = {}
    for ci, c in enumerate(classes):
        dm = d_cls == ci
        gm = g_cls_a == ci
        rec, prec, npos = _evaluate_class(
            d_img[dm], d_box[dm], d_score[dm], g_img_a[gm], g_box_a[gm], g_diff_a[gm],
            num_images, float(iou_thresh), pixel_plus_one,
        )
        num_gt[c] = npos
        num_diff[c] = int(np.count_nonzero(g_diff_a[gm]))
        num_det[c] = int(np.count_nonzero(dm))
        recalls[c], precisions[c] = rec, prec
        if npos == 0:
            ap07[c] = aparea[c] = None
            logger.info("class %r has no non-difficult ground truth: AP undefined, excluded from mAP", c)
        else:
            ap07[c] = voc_ap_11point(rec, prec)
            aparea[c] = voc_ap_area(rec, prec)

    def mean(d: dict[str, float | None]) -> float | None:
        vals = [v for v in d.values() if v is not None]
        return float(np.mean(vals)) if vals else None

    return VOCResult(
        classes=classes, iou_thresh=float(iou_thresh), ap_voc07=ap07, ap_area=aparea, num_gt=num_gt,
        num_difficult=num_diff, num_det=num_det, mAP_voc07=mean(ap07), mAP_area=mean(aparea),
        recall=recalls, precision=precisions,
    )


# --------------------------------------------------------------------------------------------------------------------
# detections.json
# --------------------------------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_detections_json(path: str | os.PathLike, classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read and validate a detections.json file.

    The file holds a JSON list of ``{"image_id": str, "category": str, "bbox": [xmin, ymin, xmax, ymax],
    "score": number}`` with VOC 1-based inclusive boxes (``xmax >= xmin - 1``, ``ymax >= ymin - 1``). Extra keys are
    ignored. Returns normalised dicts (floats for bbox/score).

    Raises:
        DataError: naming the file, the list index and the offending field/value (missing/unreadable file, invalid
            JSON, not a list, missing key, wrong type, bbox not 4 finite numbers, non-finite score, unknown category
            when ``classes`` is given).
    """
    p = os.fspath(path)
    try:
        with open(p, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{p}: detections file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read detections file ({e})") from None
    if not isinstance(raw, list):
        raise DataError(f"{p}: expected a JSON list of detections, got {type(raw).__name__}")
    known = set(classes) if classes is not None else None
    out: list[dict[str, Any]] = []
    for i, d in enumerate(raw):
        where = f"{p}: detections[{i}]"
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected an object, got {type(d).__name__} {d!r}")
        for key in ("image_id", "category", "bbox", "score"):
            if key not in d:
                raise DataError(f"{where}: missing key {key!r}")
        img = d["image_id"]
        if not isinstance(img, str) or not img:
            raise DataError(f"{where}.image_id: expected a non-empty string, got {img!r}")
        cat = d["category"]
        if not isinstance(cat, str):
            raise DataError(f"{where}.category: expected a string, got {cat!r}")
        if known is not None and cat not in known:
            raise DataError(f"{where}.category: unknown category {cat!r} (classes: {', '.join(classes)})")
        bbox = d["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(_is_number(v) and math.isfinite(v) for v in bbox)
        ):
            raise DataError(f"{where}.bbox: expected 4 finite numbers [xmin, ymin, xmax, ymax], got {bbox!r}")
        xmin, ymin, xmax, ymax = (float(v) for v in bbox)
        if xmax < xmin - 1 or ymax < ymin - 1:
            raise DataError(f"{where}.bbox: inverted box {bbox!r} (need xmax >= xmin - 1 and ymax >= ymin - 1)")
        score = d["score"]
        if not _is_number(score) or not math.isfinite(score):
            raise DataError(f"{where}.score: expected a finite number, got {score!r}")
        out.append({"image_id": img, "category": cat, "bbox": [xmin, ymin, xmax, ymax], "score": float(score)})
    return out
