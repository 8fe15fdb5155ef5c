"""COCO-style box AP (AP@[.5:.95] and AP50) of VOC-format detections, computed with pycocotools.

Inputs are the same as :func:`edp_det.evaluation.voc_eval.evaluate_voc`: detections and annotations with VOC 1-based
inclusive boxes. Boxes are converted to COCO ``[x, y, w, h]`` in continuous coordinates
(``x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1``), i.e. the torchvision box, so the COCO
numbers use no ``+1`` pixel convention. Difficult VOC objects become ``iscrowd=1`` regions: pycocotools ignores
detections matched to them (neither TP nor FP) and they do not count as positives; as with any COCO crowd region,
their overlap is measured as intersection / detection area. pycocotools' standard settings apply (at most 100
detections per image by score, 101-point interpolation, all areas).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from edp_det.runtime.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["evaluate_coco", "voc_to_coco"]


def _voc_box_to_xywh(b: Sequence[float]) -> list[float]:
    xmin, ymin, xmax, ymax = (float(v) for v in b)
    return [xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0]


def voc_to_coco(
    detections: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, Sequence[Mapping[str, Any]]],
    classes: Sequence[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build (COCO ground-truth dataset dict, COCO result list) from VOC-style detections/annotations.

    Image ids are 1..N in ``annotations`` order, category ids 1..C in ``classes`` order. GT of categories outside
    ``classes`` is dropped; a detection with an unknown image or category raises :class:`DataError`.
    """
    cat_id = {c: i + 1 for i, c in enumerate(classes)}
    img_id = {img: i + 1 for i, img in enumerate(annotations.keys())}
    images = [{"id": i, "file_name": str(img), "width": 0, "height": 0} for img, i in img_id.items()]
    anns = []
    for img, objs in annotations.items():
        for obj in objs:
            cid = cat_id.get(obj["category"])
            if cid is None:
                continue
            x, y, w, h = _voc_box_to_xywh(obj["bbox"])
            crowd = 1 if obj.get("difficult", False) else 0
            anns.append({
                "id": len(anns) + 1,  # COCOeval treats id 0 as "unmatched": ids start at 1
                "image_id": img_id[img], "category_id": cid, "bbox": [x, y, w, h],
                "area": max(w, 0.0) * max(h, 0.0), "iscrowd": crowd, "ignore": crowd,
            })
    gt = {
        "info": {"description": "edp-det VOC->COCO conversion"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": c} for c, i in cat_id.items()],
    }
    results = []
    for k, det in enumerate(detections):
        iid = img_id.get(det["image_id"])
        if iid is None:
            raise DataError(f"detections[{k}].image_id={det['image_id']!r} is not an image of the evaluated split")
        cid = cat_id.get(det["category"])
        if cid is None:
            raise DataError(f"detections[{k}].category={det['category']!r} is not one of the classes {list(classes)}")
        results.append({
            "image_id": iid, "category_id": cid, "bbox": _voc_box_to_xywh(det["bbox"]), "score": float(det["score"]),
        })
    return gt, results


def evaluate_coco(
    detections: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, Sequence[Mapping[str, Any]]],
    classes: Sequence[str],
) -> dict[str, float]:
    """COCO box AP over IoU 0.50:0.95 and AP at IoU 0.50.

    Returns ``{"coco_ap": float, "coco_ap50": float}``. No detections -> both 0.0. No non-difficult ground truth at
    all -> both NaN (undefined; JSON writers should emit ``null``). pycocotools' console output is suppressed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, results = voc_to_coco(detections, annotations, classes)
    num_pos = sum(1 for a in gt_dict["annotations"] if not a["iscrowd"])
    if num_pos == 0:
        logger.info("COCO AP undefined: no non-difficult ground truth")
        return {"coco_ap": math.nan, "coco_ap50": math.nan}
    if not results:
        return {"coco_ap": 0.0, "coco_ap50": 0.0}

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)

    def clean(v: float) -> float:
        return math.nan if v < 0 else float(v)  # pycocotools uses -1 for "undefined"

    return {"coco_ap": clean(stats[0]), "coco_ap50": clean(stats[1])}
