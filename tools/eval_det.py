"""Evaluate a (compressed) detector or a detections.json file on a VOC-format split.

Two modes:
  * ``--model model_final.pt``: load with ``edp_det.load_compressed``, run it over the split, write
    ``detections.json`` and ``metrics.json``;
  * ``--detections dets.json``: evaluate an existing detections file (VOC 1-based inclusive boxes).

``metrics.json`` holds ``mAP_voc07``, ``mAP_area``, ``ap_per_class``, ``coco_ap``, ``coco_ap50``, ``iou_thresh``,
``split``, ``num_images`` (undefined values are ``null``). Conventions: see ``edp_det/evaluation/voc_eval.py``.

Examples::

    python tools/eval_det.py --detections runs/x/detections.json --data-root data/VOC2007 --split test
    python tools/eval_det.py --model runs/x/model_final.pt --data-root data/VOC2007 --split test --output-dir runs/x

Bad input (missing file, malformed JSON, unknown category, image id not in the split) prints one error line and exits
with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from typing import Any

logger = logging.getLogger("eval_det")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="VOC07 mAP (11-point and area) + COCO AP of a detector or a detections.json on a VOC split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="compressed model file (model_final.pt) loaded with edp_det.load_compressed")
    src.add_argument("--detections", help="detections.json: list of {image_id, category, bbox (VOC 1-based), score}")
    p.add_argument("--data-root", required=True, help="VOC-format root (Annotations/, ImageSets/Main/, JPEGImages/)")
    p.add_argument("--split", default="test", help="image set name (ImageSets/Main/<split>.txt)")
    p.add_argument("--output-dir", default=None,
                   help="where metrics.json (and detections.json in --model mode) go; default: the input file's folder")
    p.add_argument("--iou-thresh", type=float, default=0.5, help="VOC match threshold (IoU strictly greater)")
    p.add_argument("--device", default="cpu", help="torch device for --model mode")
    p.add_argument("--classes", default=None, help="comma-separated class names (label order); default: dataset's")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass in --model mode")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers in --model mode")
    p.add_argument("--no-coco", action="store_true", help="skip the COCO-style AP (coco_ap/coco_ap50 = null)")
    p.add_argument("--progress", action="store_true", help="progress bar in --model mode")
    return p


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json_atomic(obj: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_num_classes(model, classes, path) -> None:
    from edp_det.runtime.errors import ConfigError

    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    n_out = getattr(getattr(predictor, "cls_score", None), "out_features", None)
    if isinstance(n_out, int) and n_out != len(classes) + 1:
        raise ConfigError(
            f"{path}: model predicts {n_out - 1} classes but the evaluation uses {len(classes)} "
            f"({', '.join(classes)}); pass --classes with the model's class names in label order"
        )


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from edp_det.data.voc import VOCDataset
    from edp_det.runtime.errors import ConfigError, DataError
    from edp_det.evaluation import evaluate_coco, evaluate_voc, load_detections_json
    from edp_det.evaluation.predict import predict_detections, save_detections_json

    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise ConfigError(f"--classes: no class names in {args.classes!r}")
    if not (0.0 <= args.iou_thresh < 1.0):
        raise ConfigError(f"--iou-thresh: must be in [0, 1), got {args.iou_thresh}")
    src = args.model if args.model is not None else args.detections
    if not os.path.isfile(src):
        raise DataError(f"{src}: file not found ({'--model' if args.model is not None else '--detections'})")
    out_dir = args.output_dir if args.output_dir is not None else (os.path.dirname(os.path.abspath(src)) or ".")

    model = None
    if args.model is not None:
        from edp_det import load_compressed

        model = load_compressed(args.model)
        if classes is None and getattr(model, "classes", None):
            classes = [str(c) for c in model.classes]  # label order the model was trained with, if it records it
        if classes is not None:
            _check_num_classes(model, classes, args.model)

    # images are only opened for prediction; in --detections mode only their presence is checked
    dataset = VOCDataset(args.data_root, args.split, classes=classes, check_images=model is not None,
                         evaluation=True)
    classes = list(dataset.classes)
    annotations = dataset.annotations()

    if model is not None:
        _check_num_classes(model, classes, args.model)
        dets = predict_detections(
            model, dataset, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
            progress=args.progress, classes=classes,
        )
        det_path = os.path.join(out_dir, "detections.json")
        save_detections_json(dets, det_path)
        logger.info("wrote %s (%d detections)", det_path, len(dets))
    else:
        dets = load_detections_json(args.detections, classes=classes)
        for i, d in enumerate(dets):
            if d["image_id"] not in annotations:
                raise DataError(
                    f"{args.detections}: detections[{i}].image_id={d['image_id']!r} is not in split "
                    f"{args.split!r} of {args.data_root}"
                )

    voc = evaluate_voc(dets, annotations, classes, iou_thresh=args.iou_thresh)
    if args.no_coco:
        coco = {"coco_ap": None, "coco_ap50": None}
    else:
        coco = evaluate_coco(dets, annotations, classes)
    metrics = voc.to_dict()
    metrics.update(coco)
    metrics["split"] = args.split
    metrics["num_images"] = len(annotations)
    metrics = _json_safe(metrics)
    metrics_path = os.path.join(out_dir, "metrics.json")
    _write_json_atomic(metrics, metrics_path)

    print(voc.format_table())

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    print(f"COCO AP@[.5:.95] {fmt(metrics['coco_ap'])}  AP50 {fmt(metrics['coco_ap50'])}")
    print(f"wrote {metrics_path}")
    return metrics


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation; returns the metrics dict. Bad input -> one line on stderr and SystemExit(2)."""
    from edp_det.runtime.errors import EDPError

    try:
        return _run(args)
    except (EDPError, ValueError, OSError) as e:
        # one line; a dataset validation error may append its list of problems on the following lines
        msg = str(e).strip() or type(e).__name__
        print(f"eval_det: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
