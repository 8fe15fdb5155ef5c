"""Albumentations pipelines for detection (numpy HWC uint8 image + continuous xyxy boxes).

Config keys (all optional; ``None`` means the defaults in :data:`DEFAULT_TRANSFORMS`)::

    hflip: 0.5                 # probability of a horizontal flip
    scale_jitter: [0.8, 1.2]   # zoom factor range around the image centre (canvas size kept; the
                               # detector's own resize would undo a plain rescale); null = off
    brightness_contrast: 0.2   # +-limit of brightness and contrast (p = 0.5); 0 = off
    hue_saturation: 0.0        # strength s: hue +-100*s, saturation +-150*s, value +-100*s (p = 0.5);
                               # 0.2 equals albumentations' defaults (+-20, +-30, +-20); 0 = off
    resize: null               # int: longest side to this size (aspect kept); [h, w]: exact size.
                               # Applied to train and eval alike. Boxes follow; ``orig_size`` in the
                               # target stays the size before transforms.
    min_visibility: 0.3        # boxes keeping less than this fraction of their area are removed
    seed: null                 # albumentations' own RNG seed (reproducible augmentation)

Eval pipelines contain only ``resize`` (a no-op ``Compose`` when it is null). Boxes that vanish
are removed together with their ``labels`` / ``difficult`` entries (the label fields,
:data:`LABEL_FIELDS`).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import albumentations as A
import cv2

from edp_det.runtime.errors import ConfigError

__all__ = ["DEFAULT_TRANSFORMS", "LABEL_FIELDS", "build_transforms"]

LABEL_FIELDS = ("labels", "difficult")

DEFAULT_TRANSFORMS: dict[str, Any] = {
    "hflip": 0.5,
    "scale_jitter": None,
    "brightness_contrast": 0.0,
    "hue_saturation": 0.0,
    "resize": None,
    "min_visibility": 0.3,
    "seed": None,
}


def _prob(name: str, v: Any, lo: float = 0.0, hi: float = 1.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= float(v) <= hi):
        raise ConfigError(f"transforms.{name}={v!r}: expected a number in [{lo:g}, {hi:g}]")
    return float(v)


def _resize(v: Any) -> A.BasicTransform | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return A.LongestMaxSize(max_size=int(v), interpolation=cv2.INTER_LINEAR)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        return A.Resize(height=int(v[0]), width=int(v[1]), interpolation=cv2.INTER_LINEAR)
    raise ConfigError(f"transforms.resize={v!r}: expected null, a positive int (longest side) or [height, width]")


def build_transforms(cfg: Mapping[str, Any] | None, train: bool) -> A.Compose:
    """Build the detection pipeline from ``cfg`` (see module docstring); eval = resize only.

    The result is called as ``t(image=HWC uint8, bboxes=[N, 4] xyxy, labels=[...], difficult=[...])``.
    Unknown keys or bad values raise :class:`ConfigError` naming the key and value.
    """
    opts = dict(DEFAULT_TRANSFORMS)
    if cfg is not None:
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"transforms={cfg!r}: expected a mapping of options")
        unknown = sorted(set(cfg) - set(DEFAULT_TRANSFORMS))
        if unknown:
            raise ConfigError(
                f"transforms.{unknown[0]}={cfg[unknown[0]]!r}: unknown option (known: {', '.join(DEFAULT_TRANSFORMS)})"
            )
        opts.update(cfg)

    ops: list[A.BasicTransform] = []
    if train:
        hflip = _prob("hflip", opts["hflip"] if opts["hflip"] is not None else 0.0)
        if hflip > 0:
            ops.append(A.HorizontalFlip(p=hflip))
        sj = opts["scale_jitter"]
        if sj is not None:
            if (
                not isinstance(sj, (list, tuple)) or len(sj) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sj)
                or not (0 < float(sj[0]) <= float(sj[1]))
            ):
                raise ConfigError(f"transforms.scale_jitter={sj!r}: expected [low, high] with 0 < low <= high")
            lo, hi = float(sj[0]), float(sj[1])
            if (lo, hi) != (1.0, 1.0):
                ops.append(A.Affine(scale=(lo, hi), keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
        bc = _prob("brightness_contrast", opts["brightness_contrast"] or 0.0)
        if bc > 0:
            ops.append(A.RandomBrightnessContrast(brightness_limit=bc, contrast_limit=bc, p=0.5))
        hs = _prob("hue_saturation", opts["hue_saturation"] or 0.0)
        if hs > 0:
            ops.append(A.HueSaturationValue(hue_shift_limit=100 * hs, sat_shift_limit=150 * hs, val_shift_limit=100 * hs, p=0.5))
    rs = _resize(opts["resize"])
    if rs is not None:
        ops.append(rs)
    min_vis = _prob("min_visibility", opts["min_visibility"] if opts["min_visibility"] is not None else 0.0)
    seed = opts["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"transforms.seed={seed!r}: expected an integer or null")
    bbox_params = A.BboxParams(
        format="pascal_voc",  # albumentations' pascal_voc = pixel xyxy, i.e. our continuous boxes
        label_fields=list(LABEL_FIELDS),
        min_visibility=min_vis,
        clip=True,
        filter_invalid_bboxes=True,
    )
    with warnings.catch_warnings():
        # an empty (eval) pipeline warns that no transform processes the boxes; that is intended
        warnings.filterwarnings("ignore", message=".*no transform to process.*")
        return A.Compose(ops, bbox_params=bbox_params, seed=seed)
