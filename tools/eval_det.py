"""Evaluate a (compressed) detector, or a detections.json file, on a VOC-format split: VOC07 mAP (11-point and
area) and COCO AP, written to metrics.json in an evaluation folder of its own.

examples:
  python tools/eval_det.py --model runs/x/model_final.pt --data-root data/VOC2007 --split test
      -> runs/x/eval_test/metrics.json and runs/x/eval_test/detections.json
  python tools/eval_det.py --detections dets.json --data-root data/VOC2007 --split test --output-dir evals/dets
  python tools/eval_det.py --model runs/x/model_final.pt --data-root data/VOC2007 --device cpu --no-coco

modes:
  --model FILE       load with edp_det.load_compressed, run it over the split (on CUDA when available, else CPU),
                     write detections.json and metrics.json
  --detections FILE  evaluate an existing detections file: a JSON list of {image_id, category, bbox, score} with
                     VOC 1-based inclusive boxes

The output folder defaults to eval_<split>/ next to the input file; evaluation never writes into a training run's
own files (a --output-dir holding a training run is refused), and a folder that already holds the results it would
write (metrics.json, and detections.json with --model) is refused unless --overwrite is given. --classes must
agree with the class names the model file records (their label order), when it records them. metrics.json holds
mAP_voc07, mAP_area, ap_per_class, coco_ap, coco_ap50, iou_thresh, split, num_images (undefined values are null).
Bad input (missing file, a model that is not a detector, malformed JSON, unknown category, image id not in the
split) prints one error line and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from edp_det.harness.cli import INTERRUPTED_ATOMIC, cli_main, tool_parser

logger = logging.getLogger("eval_det")


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="compressed model file (model_final.pt) loaded with edp_det.load_compressed")
    src.add_argument("--detections", help="detections.json: list of {image_id, category, bbox (VOC 1-based), score}")
    p.add_argument("--data-root", required=True, help="VOC-format root (Annotations/, ImageSets/Main/, JPEGImages/)")
    p.add_argument("--split", default="test", help="image set name (ImageSets/Main/<split>.txt)")
    p.add_argument("--output-dir", default=None,
                   help="where metrics.json (and detections.json in --model mode) go; default: eval_<split>/ in the "
                        "input file's folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier evaluation (metrics.json, detections.json) in the output "
                        "folder")
    p.add_argument("--iou-thresh", type=float, default=0.5,
                   help="VOC match threshold, > 0 and < 1 (a hit has IoU strictly greater)")
    p.add_argument("--device", default=None,
                   help="torch device for --model mode (default: cuda if available, else cpu)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names (label order); default: the model's, else the dataset's")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass in --model mode")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers in --model mode")
    p.add_argument("--no-coco", action="store_true", help="skip the COCO-style AP (coco_ap/coco_ap50 = null)")
    p.add_argument("--progress", action="store_true", help="progress bar in --model mode")
    return p


def result_files(args: argparse.Namespace) -> list[str]:
    """The files the evaluation writes into its output folder."""
    return ["metrics.json"] + (["detections.json"] if args.model is not None else [])


def output_dir(args: argparse.Namespace) -> Path:
    """``--output-dir``, or ``eval_<split>/`` next to the input file. Refused: a folder holding a training run, and
    one holding the results of an earlier evaluation (:func:`result_files`) unless ``--overwrite``."""
    from edp_det.harness.cli import training_run_files
    from edp_det.runtime.errors import ConfigError

    src = args.model if args.model is not None else args.detections
    if args.output_dir is None:
        out = Path(os.path.abspath(src)).parent / f"eval_{args.split}"
        where = f"{out} (the default output folder)"
    else:
        out = Path(args.output_dir)
        where = f"--output-dir {out}"
    held = training_run_files(out)
    if held:
        raise ConfigError(f"{where}: holds a training run ({', '.join(held[:5])}); evaluation does not write "
                          f"into it: omit --output-dir (results go to eval_{args.split}/ next to the input) or give "
                          "another folder")
    earlier = [f for f in result_files(args) if (out / f).exists()]
    if earlier and not args.overwrite:
        raise ConfigError(f"{where}: already holds {', '.join(earlier)} of an earlier evaluation; pass --overwrite "
                          f"to replace {'it' if len(earlier) == 1 else 'them'}, or give another --output-dir")
    return out


def _check_model_classes(model, classes, path) -> None:
    """``--classes`` must list the classes the model file records, in its label order."""
    from edp_det.runtime.errors import ConfigError

    recorded = getattr(model, "classes", None)
    if classes is not None and recorded and [str(c) for c in recorded] != list(classes):
        raise ConfigError(f"--classes {','.join(classes)}: contradicts the classes {path} was trained with, in label "
                          f"order: {','.join(str(c) for c in recorded)}; omit --classes or give them in that order")


def _check_num_classes(model, classes, path) -> None:
    from edp_det.runtime.errors import ConfigError

    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    n_out = getattr(getattr(predictor, "cls_score", None), "out_features", None)
    if isinstance(n_out, int) and n_out != len(classes) + 1:
        raise ConfigError(
            f"{path}: model predicts {n_out - 1} classes but the evaluation uses {len(classes)} "
            f"({', '.join(classes)}); pass --classes with the model's class names in label order"
        )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation; returns the metrics dict (also written to ``<output dir>/metrics.json``)."""
    from edp_det.data.voc import VOCDataset
    from edp_det.evaluation import evaluate_detections, evaluate_detector, load_detections_json
    from edp_det.evaluation.predict import save_detections_json
    from edp_det.harness.cli import json_safe, load_detector, resolve_device, write_json
    from edp_det.runtime.errors import ConfigError, DataError

    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise ConfigError(f"--classes: no class names in {args.classes!r}")
    if not (0.0 < args.iou_thresh < 1.0):
        raise ConfigError(f"--iou-thresh: must be > 0 and < 1, got {args.iou_thresh}")
    src = args.model if args.model is not None else args.detections
    if not os.path.isfile(src):
        raise DataError(f"{src}: file not found ({'--model' if args.model is not None else '--detections'})")
    out_dir = output_dir(args)

    model = None
    if args.model is not None:
        device = resolve_device(args.device)
        model = load_detector(args.model, "--model")
        _check_model_classes(model, classes, args.model)
        if classes is None and getattr(model, "classes", None):
            classes = [str(c) for c in model.classes]  # label order the model was trained with, if it records it
        if classes is not None:
            _check_num_classes(model, classes, args.model)

    # images are only opened for prediction; in --detections mode only their presence is checked
    dataset = VOCDataset(args.data_root, args.split, classes=classes, check_images=model is not None,
                         evaluation=True)
    classes = list(dataset.classes)

    if model is not None:
        _check_num_classes(model, classes, args.model)
        res = evaluate_detector(model, dataset, classes, device=device, batch_size=args.batch_size,
                                iou_thresh=args.iou_thresh, coco=not args.no_coco, num_workers=args.num_workers,
                                progress=args.progress)
        det_path = out_dir / "detections.json"
        (out_dir / "metrics.json").unlink(missing_ok=True)   # --overwrite: never the old metrics beside new detections
        save_detections_json(res.detections, det_path)
        logger.info("wrote %s (%d detections)", det_path, len(res.detections))
        num_images = len(dataset)
    else:
        annotations = dataset.annotations()
        dets = load_detections_json(args.detections, classes=classes)
        for i, d in enumerate(dets):
            if d["image_id"] not in annotations:
                raise DataError(
                    f"{args.detections}: detections[{i}].image_id={d['image_id']!r} is not in split "
                    f"{args.split!r} of {args.data_root}"
                )
        res = evaluate_detections(dets, annotations, classes, iou_thresh=args.iou_thresh, coco=not args.no_coco)
        num_images = len(annotations)

    metrics = dict(res.metrics)
    for key in ("coco_ap", "coco_ap50"):   # null with --no-coco
        metrics.setdefault(key, None)
    metrics.update(split=args.split, num_images=num_images)
    metrics_path = write_json(metrics, out_dir / "metrics.json")
    print(res.voc.format_table())

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    print(f"COCO AP@[.5:.95] {fmt(metrics['coco_ap'])}  AP50 {fmt(metrics['coco_ap50'])}")
    print(f"wrote {metrics_path}")
    return json_safe(metrics)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli_main(main, get_args_parser().parse_args(), "eval_det", interrupted=INTERRUPTED_ATOMIC)
