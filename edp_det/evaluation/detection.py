"""One detection evaluation: detections → VOC07 / area mAP (+ COCO AP), and a detector → its detections on a
dataset → the same metrics. Used by the training engine's evaluation and by ``tools/eval_det.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from edp_det.evaluation.voc_eval import VOCResult, evaluate_voc

__all__ = ["DetectionEvaluation", "evaluate_detections", "evaluate_detector"]


@dataclass
class DetectionEvaluation:
    """``metrics``: :meth:`VOCResult.to_dict` plus ``coco_ap`` / ``coco_ap50`` when COCO AP was computed;
    ``voc``: the per-class VOC result (``format_table()``); ``detections``: the evaluated VOC-format records."""

    metrics: dict[str, Any]
    voc: VOCResult
    detections: list[dict[str, Any]]


def evaluate_detections(detections: Sequence[Mapping[str, Any]], annotations: Mapping[str, Sequence[Mapping]],
                        classes: Sequence[str], iou_thresh: float = 0.5, coco: bool = True) -> DetectionEvaluation:
    """VOC07 11-point and area mAP at IoU > ``iou_thresh`` and, with ``coco``, COCO AP@[.5:.95] / AP50 of VOC-format
    ``detections`` against the ground truth ``annotations`` (see :mod:`edp_det.evaluation.voc_eval`)."""
    voc = evaluate_voc(detections, annotations, classes, iou_thresh=iou_thresh)
    metrics = voc.to_dict()
    if coco:
        from edp_det.evaluation.coco_eval import evaluate_coco

        metrics.update(evaluate_coco(detections, annotations, classes))
    return DetectionEvaluation(metrics, voc, list(detections))


def evaluate_detector(model, dataset, classes: Sequence[str], device="cpu", batch_size: int = 1,
                      iou_thresh: float = 0.5, coco: bool = True, num_workers: int = 0,
                      progress: bool = False) -> DetectionEvaluation:
    """Run ``model`` over every image of ``dataset`` (a VOC-style dataset with ``annotations()``) and evaluate its
    detections with :func:`evaluate_detections`."""
    from edp_det.evaluation.predict import predict_detections

    dets = predict_detections(model, dataset, device=device, batch_size=batch_size, num_workers=num_workers,
                              progress=progress, classes=classes)
    return evaluate_detections(dets, dataset.annotations(), classes, iou_thresh=iou_thresh, coco=coco)
