"""Datasets: VOC reader + validation, up-front image checks (full decode, cached), albumentations
transforms, synthetic VOC, ImageFolder.

Names are re-exported lazily (PEP 562) so that ``import edp_det.data`` does not pull in
albumentations/OpenCV until a transform is actually built.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "edp_det.data.voc": (
        "VOC07_CLASSES", "IMAGE_EXTENSIONS", "BOX_TOLERANCE", "MIN_BOX_SIDE", "Problem", "VOCRecord", "VOCDataset",
        "apply_on_error", "collate_fn", "collect_classes", "format_problems", "load_image", "parse_voc_xml",
        "read_split",
        "resolve_voc_root", "validate_voc_split", "voc_to_xyxy", "xyxy_to_voc",
    ),
    "edp_det.data.imagecheck": (
        "EXIF_ORIENTATION_TAG", "TRANSPOSING_ORIENTATIONS", "ImageCheckReport", "ImageInfo", "check_images",
        "decode_image", "default_cache_dir", "image_cache_file",
    ),
    "edp_det.data.transforms": ("DEFAULT_TRANSFORMS", "LABEL_FIELDS", "build_transforms"),
    "edp_det.data.synthetic": ("SHAPES", "make_synthetic_voc", "render_scene"),
    "edp_det.data.imagefolder": (
        "IMAGENET_MEAN", "IMAGENET_STD", "build_classification_transforms", "build_imagefolder", "list_classes",
        "make_synthetic_imagefolder", "validate_imagefolder",
    ),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
