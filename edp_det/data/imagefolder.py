"""ImageNet-style folders for classification (``root/train/<class>/*``, ``root/val/<class>/*``).

:func:`validate_imagefolder` checks a split up front; :func:`build_imagefolder` returns a
torchvision ``ImageFolder`` whose class list (and therefore label indices) is always the train
split's, so a val folder with fewer classes keeps the right labels.
:func:`make_synthetic_imagefolder` writes one-shape-per-image crops of the synthetic shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from edp_det.data import imagecheck
from edp_det.data.synthetic import SHAPES, render_scene
from edp_det.data.voc import Problem, apply_on_error
from edp_det.runtime.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_classification_transforms",
    "build_imagefolder",
    "list_classes",
    "make_synthetic_imagefolder",
    "validate_imagefolder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_EXTS = tuple(e.lower() for e in IMG_EXTENSIONS)


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _EXTS


def list_classes(root: str | Path, split: str = "train") -> list[str]:
    """Sorted class-folder names of ``root/split`` (hidden folders ignored). Raises DataError."""
    d = Path(root) / split
    if not d.is_dir():
        raise DataError(f"{d}: split={split!r}: split folder not found")
    return sorted(e.name for e in d.iterdir() if e.is_dir() and not e.name.startswith("."))


def validate_imagefolder(
    root: str | Path,
    split: str,
    classes: Sequence[str] | None = None,
    check_images: bool = True,
    image_cache: str | Path | bool | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> tuple[list[tuple[str, int]], list[Problem]]:
    """Check ``root/split``; return usable ``(path, class_index)`` samples and the problems.

    ``classes`` defaults to the train split's class folders (the split's own folders when
    ``split == "train"`` or there is no train split). Errors: missing split folder, no class
    folders, a class folder not among ``classes`` (e.g. a val class missing from train), empty
    class folder (train only; warning for other splits), unreadable image (when ``check_images``:
    every image fully decoded up front by :func:`edp_det.data.imagecheck.check_images`, verdicts
    cached per (path, size, mtime) in ``imagecheck.image_cache_file(root, image_cache)``). Warnings:
    a class of ``classes`` without a folder in a non-train split. ``Problem.image_id`` holds the
    class name.
    """
    root = Path(root)
    d = root / split
    problems: list[Problem] = []
    samples: list[tuple[str, int]] = []
    if not d.is_dir():
        problems.append(Problem(None, str(d), "split", split, "split folder not found"))
        return samples, problems
    present = list_classes(root, split)
    if classes is None:
        if split != "train" and (root / "train").is_dir():
            classes = list_classes(root, "train")
        else:
            classes = present
    classes = list(classes)
    if not present:
        problems.append(Problem(None, str(d), "classes", split, "no class folders in the split"))
        return samples, problems
    index = {c: i for i, c in enumerate(classes)}
    for c in present:
        if c not in index:
            problems.append(Problem(c, str(d / c), "class", c, "class folder is not among the train classes"))
    for c in classes:
        if c not in present:
            sev = "error" if split == "train" else "warning"
            problems.append(Problem(c, str(d / c), "class", c, f"class has no folder in split {split!r}", sev))
    found: list[tuple[str, Path]] = []
    for c in present:
        if c not in index:
            continue
        files = sorted(p for p in (d / c).rglob("*") if _is_image_file(p))
        if not files:
            sev = "error" if split == "train" else "warning"
            problems.append(Problem(c, str(d / c), "images", 0, "class folder holds no image files", sev))
            continue
        found.extend((c, f) for f in files)
    infos = {}
    if check_images:
        infos = imagecheck.check_images([f for _, f in found],
                                        cache_file=imagecheck.image_cache_file(root, image_cache), workers=workers, desc=f"checking images of split {split!r}",
                                        show_progress=show_progress).infos
    for c, f in found:
        info = infos.get(str(f))
        if info is not None and not info.ok:
            problems.append(Problem(c, str(f), "image", f.name, f"unreadable image ({info.error})"))
            continue
        samples.append((str(f), index[c]))
    return samples, problems


def build_classification_transforms(train: bool, image_size: int = 224) -> T.Compose:
    """Standard ImageNet transforms: RandomResizedCrop + flip (train) or Resize(size/0.875) + CenterCrop."""
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), norm])


class _ValidatedImageFolder(ImageFolder):
    """ImageFolder over an already validated sample list, with a fixed (train) class list."""

    def __init__(self, split_dir: Path, classes: list[str], samples: list[tuple[str, int]], transform):
        self._fixed_classes = classes
        self._fixed_samples = samples
        super().__init__(str(split_dir), transform=transform, allow_empty=True)

    def find_classes(self, directory):
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return list(self._fixed_samples)

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except OSError as e:  # a file changed or broke after the up-front check
            path = self.samples[index][0]
            raise DataError(f"{path}: image: cannot read image ({type(e).__name__}: {e})") from e


def build_imagefolder(
    root: str | Path,
    split: str,
    train: bool,
    image_size: int = 224,
    on_error: str = "raise",
    check_images: bool = True,
    evaluation: bool = False,
    skip_bad_eval_images: bool = False,
    image_cache: str | Path | bool | None = None,
) -> ImageFolder:
    """A torchvision ``ImageFolder`` for ``root/split`` with the train split's class list.

    The split is validated first (:func:`validate_imagefolder`). ``on_error="raise"`` raises
    :class:`DataError` listing every error (folder/file and field, first 20 and a count); ``"skip"``
    drops unreadable files and stray class folders, logs one warning listing them and records them
    in ``dataset.skipped``. For an ``evaluation`` split ``"skip"`` raises too unless
    ``skip_bad_eval_images`` (dropping evaluation images changes the benchmark). A file that cannot
    be read later, during training, raises :class:`DataError` naming it.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"build_imagefolder: on_error={on_error!r}: must be 'raise' or 'skip'")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"build_imagefolder: image_size={image_size!r}: expected a positive integer")
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir}: split='train': train folder not found (its class list defines the labels)")
    classes = list_classes(root, "train")
    if not classes:
        raise DataError(f"{train_dir}: classes: no class folders in the train split")
    samples, problems = validate_imagefolder(root, split, classes, check_images=check_images, image_cache=image_cache)
    errors = [p for p in problems if p.severity == "error"]
    apply_on_error(f"{root / split}", errors, on_error, bool(samples), evaluation, skip_bad_eval_images, "image folder")
    for p in (p for p in problems if p.severity == "warning"):
        logger.warning("%s", p)
    ds = _ValidatedImageFolder(root / split, classes, samples, build_classification_transforms(train, image_size))
    ds.skipped = errors
    ds.problems = problems
    return ds


def make_synthetic_imagefolder(
    out: str | Path,
    num_per_class_train: int,
    num_per_class_val: int,
    image_size: int = 64,
    seed: int = 0,
    classes: Sequence[str] = ("circle", "square", "triangle"),
) -> dict:
    """Write ``out/{train,val}/<shape>/<shape>_<i>.JPEG``: one large shape per textured image.

    Deterministic for a given seed. Returns a summary dict.
    """
    classes = [str(c) for c in classes]
    bad = [c for c in classes if c not in SHAPES]
    if bad or not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"synthetic classes={classes!r}: expected distinct names from {', '.join(SHAPES)}")
    for name, v, lo in (("num_per_class_train", num_per_class_train, 0), ("num_per_class_val", num_per_class_val, 0),
                        ("image_size", image_size, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"synthetic {name}={v!r}: expected an integer >= {lo}")
    out = Path(out)
    counts = {}
    for split_code, (split, n) in enumerate((("train", num_per_class_train), ("val", num_per_class_val))):
        for ci, c in enumerate(classes):
            d = out / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([int(seed), 100 + split_code, ci, i])
                img, objs = render_scene(rng, image_size, [c], 1, size_range=(0.45, 0.8),
                                         difficult_prob=0.0, truncated_prob=0.0)
                Image.fromarray(img).save(d / f"{c}_{i:05d}.JPEG", quality=95, subsampling=0)
            counts[f"{split}/{c}"] = n
    return {"root": str(out), "classes": classes, "image_size": image_size, "seed": seed, "counts": counts}
