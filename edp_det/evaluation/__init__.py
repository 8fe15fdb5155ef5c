"""Evaluation: VOC07 mAP (py-faster-rcnn conventions), COCO AP via pycocotools, classification top-k, prediction."""
from edp_det.evaluation.classification import AccuracyMeter, topk_accuracy, topk_correct
from edp_det.evaluation.coco_eval import evaluate_coco
from edp_det.evaluation.detection import DetectionEvaluation, evaluate_detections, evaluate_detector
from edp_det.evaluation.predict import predict_detections, save_detections_json
from edp_det.evaluation.voc_eval import VOCResult, evaluate_voc, load_detections_json

__all__ = [
    "AccuracyMeter",
    "DetectionEvaluation",
    "VOCResult",
    "evaluate_coco",
    "evaluate_detections",
    "evaluate_detector",
    "evaluate_voc",
    "load_detections_json",
    "predict_detections",
    "save_detections_json",
    "topk_accuracy",
    "topk_correct",
]
