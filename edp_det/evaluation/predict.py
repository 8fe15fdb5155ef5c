"""Run a torchvision detector over a dataset and produce VOC-format detections (``detections.json`` records).

Each record is ``{"image_id": str, "category": str, "bbox": [xmin, ymin, xmax, ymax], "score": float}`` with VOC
1-based inclusive boxes converted from the model's continuous xyxy boxes: ``xmin = x1 + 1, ymin = y1 + 1, xmax = x2,
ymax = y2``. Label ``i`` (1..C) maps to ``classes[i - 1]``.

Torchvision detectors return boxes in the coordinate frame of the image tensor they were given. If a dataset's
transform resized the image and its target carries ``"orig_size"`` = (H, W) of the original image, boxes are scaled
back to that size before conversion.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch
from torch import nn

from edp_det.runtime.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["predict_detections", "save_detections_json", "outputs_to_detections"]


def _default_collate(batch):
    return tuple(zip(*batch))


def _image_id(target: Any, index: int) -> str:
    if not isinstance(target, dict) or "image_id" not in target:
        raise DataError(f"dataset item {index}: target has no 'image_id' key")
    img = target["image_id"]
    if isinstance(img, torch.Tensor):
        img = img.item() if img.numel() == 1 else img.tolist()
    if not isinstance(img, (str, int)) or isinstance(img, bool):
        raise DataError(f"dataset item {index}: target['image_id'] must be a string, got {img!r}")
    return str(img)


def outputs_to_detections(
    output: dict[str, torch.Tensor], image_id: str, classes: Sequence[str], scale_xy: tuple[float, float] = (1.0, 1.0)
) -> list[dict[str, Any]]:
    """Convert one torchvision detection output ``{"boxes", "labels", "scores"}`` into VOC-format records."""
    boxes = output["boxes"].detach().to("cpu", torch.float64)
    labels = output["labels"].detach().to("cpu").tolist()
    scores = output["scores"].detach().to("cpu", torch.float64).tolist()
    sx, sy = scale_xy
    if sx != 1.0 or sy != 1.0:
        boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    dets = []
    for box, label, score in zip(boxes.tolist(), labels, scores):
        if not 1 <= int(label) <= len(classes):
            logger.warning("image %s: dropping detection with label %s outside 1..%d", image_id, label, len(classes))
            continue
        x1, y1, x2, y2 = box
        dets.append({
            "image_id": image_id,
            "category": classes[int(label) - 1],
            "bbox": [x1 + 1.0, y1 + 1.0, x2, y2],
            "score": float(score),
        })
    return dets


def predict_detections(
    model: nn.Module,
    dataset,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = False,
    classes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Detections of ``model`` on every item of ``dataset`` as VOC-format records.

    Args:
        model: torchvision-style detector; moved to ``device`` and put in eval mode (its train/eval mode is restored
            afterwards), run under ``torch.inference_mode``.
        dataset: items ``(image float [3, H, W], target dict with "image_id")``; ``dataset.classes`` names labels 1..C
            unless ``classes`` is given. ``dataset.collate_fn`` is used if present.
        progress: show a tqdm progress bar.
    """
    if classes is None:
        classes = getattr(dataset, "classes", None)
        if classes is None:
            raise DataError("predict_detections: dataset has no .classes; pass classes=[...]")
    classes = list(classes)
    device = torch.device(device)
    collate = getattr(dataset, "collate_fn", None) or _default_collate
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    was_training = model.training
    model.to(device)
    model.eval()
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="predict", unit="batch")
    dets: list[dict[str, Any]] = []
    seen = 0
    try:
        with torch.inference_mode():
            for images, targets in it:
                images = [img.to(device) for img in images]
                outputs = model(images)
                for img, tgt, out in zip(images, targets, outputs):
                    image_id = _image_id(tgt, seen)
                    scale = (1.0, 1.0)
                    orig = tgt.get("orig_size") if isinstance(tgt, dict) else None
                    if orig is not None:
                        oh, ow = (float(v) for v in (orig.tolist() if isinstance(orig, torch.Tensor) else orig))
                        h, w = img.shape[-2:]
                        scale = (ow / float(w), oh / float(h))
                    dets.extend(outputs_to_detections(out, image_id, classes, scale))
                    seen += 1
    finally:
        model.train(was_training)
    logger.info("predicted %d detections on %d images", len(dets), seen)
    return dets


def save_detections_json(dets: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write detections as a JSON list, atomically (temp file in the same folder + fsync + os.replace)."""
    from edp_det.runtime.checkpoint import atomic_write_text

    atomic_write_text(json.dumps(list(dets), allow_nan=False), path)
