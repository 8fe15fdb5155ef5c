"""The typed config schema: every key's type, default, allowed values and one-line help, declared once.

A section of the config is a dataclass whose fields are declared with :func:`option` (a leaf: type from the
annotation, default, help, ``choices`` and numeric bounds ``ge``/``gt``/``le``/``lt``) or :func:`section` (a nested
dataclass). :class:`DetectionConfig` and :class:`ClassificationConfig` are the roots of the two tasks; their
``compress`` section holds the options common to every compression method (:class:`CompressOptions`). Each method
declares its own options as a subclass of :class:`CompressOptions` (see :mod:`edp_det.methods`), so that the
``compress`` section of a run is the common options plus those of the selected method.

:class:`ConfigSchema` ties a task root to the methods' options; :func:`edp_det.runtime.config.load_config` validates
every config layer against it. :func:`schema_tree` turns a dataclass into a tree of :class:`Leaf` objects,
:func:`check_layer` validates a (partial) mapping against such a tree, :func:`parse_options` builds an options
instance from a mapping, :func:`format_config` prints a resolved config with each key's help and
:func:`markdown_reference` writes the reference of all keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from edp_det.runtime.errors import ConfigError

__all__ = [
    "option", "section", "Leaf", "OPEN", "schema_tree", "tree_from_defaults", "defaults_of", "check_layer",
    "parse_options", "ConfigSchema", "CompressOptions", "CompressSchedule", "TrainConfig", "BenchmarkConfig",
    "AugmentConfig",
    "DetectionData", "DetectionModel", "DetectionEval", "ClassificationData", "ClassificationModel",
    "ClassificationEval", "DetectionConfig", "ClassificationConfig", "TASKS", "format_config", "markdown_reference",
    "type_name",
]

TASKS = ("detection", "classification")


# ------------------------------------------------------------------------------------------- declarations
def option(default: Any, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None, old=()) -> Any:
    """A config leaf for a dataclass field: ``default``, one-line ``help``, allowed ``choices`` and numeric bounds
    (checked when the value is not null). ``old``: former dotted names of this key relative to the section the
    dataclass is mounted at (a config using one fails with a message naming the new key)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le,
            "lt": lt, "old": tuple([old] if isinstance(old, str) else old)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested section (another dataclass) of a config dataclass."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


def _copy(value):
    return [_copy(v) for v in value] if isinstance(value, list) else \
        {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


@dataclass(frozen=True)
class Leaf:
    """One config key: its type (a ``typing`` annotation; ``Any`` accepts everything), default and constraints."""

    type: Any
    default: Any
    help: str = ""
    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    old: tuple = ()

    def bounds(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


#: marker of an open mapping (any keys) in a schema tree
OPEN = Leaf(dict, {})


@functools.lru_cache(maxsize=None)
def _tree(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("section"):
            out[f.name] = _SectionNode(_tree(f.default_factory), meta.get("help", ""))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = Leaf(hints[f.name], default, meta.get("help", ""), meta.get("choices"), meta.get("ge"),
                           meta.get("gt"), meta.get("le"), meta.get("lt"), meta.get("old", ()))
    return out


class _SectionNode(dict):
    """A nested section in a schema tree (a dict of its keys) carrying its help line."""

    def __init__(self, items, help: str = ""):
        super().__init__(items)
        self.help = help


def schema_tree(cls: type) -> dict:
    """``{key: Leaf | nested tree}`` of a config dataclass (a fresh copy; nested sections are dicts with ``.help``)."""
    return _copy_tree(_tree(cls))


def _copy_tree(tree: Mapping) -> dict:
    return _SectionNode({k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()},
                        getattr(tree, "help", ""))


def tree_from_defaults(defaults: Mapping) -> dict:
    """A schema tree inferred from a plain mapping of default values: a leaf's type is its default's type (``None``:
    anything; an ``int`` default also accepts no float), ``{}`` is an open mapping, a non-empty dict a section."""
    out = _SectionNode({})
    for key, value in defaults.items():
        if isinstance(value, Mapping):
            out[key] = tree_from_defaults(value) if value else OPEN
        elif value is None:
            out[key] = Leaf(Any, None)
        elif isinstance(value, (list, tuple)):
            out[key] = Leaf(list, list(value))
        else:
            out[key] = Leaf(type(value), value)
    return out


def defaults_of(tree: Mapping) -> dict:
    """The default config of a schema tree (fresh copies)."""
    return {k: defaults_of(v) if isinstance(v, Mapping) else _copy(v.default) for k, v in tree.items()}


def all_keys(tree: Mapping, prefix: str = "") -> list[str]:
    """Every dotted key of a schema tree, sections included."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, Mapping):
            keys.extend(all_keys(value, dotted + "."))
    return keys


def lookup(tree: Mapping, dotted: str):
    """The Leaf or subtree at ``dotted`` (None if the tree does not have it; leaves under an open mapping: OPEN)."""
    node: Any = tree
    for part in dotted.split("."):
        if node is OPEN:
            return OPEN
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------- types
def _alternatives(tp) -> tuple:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def type_name(tp) -> str:
    """``int``, ``float | null``, ``list[int] | null``, ``any`` ... (as written in the reference)."""
    names = []
    for alt in _alternatives(tp):
        if alt is type(None):
            names.append("null")
        elif alt is Any:
            names.append("any")
        elif typing.get_origin(alt) is list:
            names.append(f"list[{type_name(typing.get_args(alt)[0])}]" if typing.get_args(alt) else "list")
        elif alt is dict or typing.get_origin(alt) is dict:
            names.append("mapping")
        else:
            names.append(getattr(alt, "__name__", str(alt)))
    return " | ".join(names)


def _value_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


_NO = object()


def _convert(tp, value):
    """``value`` converted to ``tp`` (int → float where a float is expected, tuple → list), or ``_NO``."""
    for alt in _alternatives(tp):
        if alt is Any:
            return value
        if alt is type(None):
            if value is None:
                return None
        elif alt is bool:
            if isinstance(value, bool):
                return value
        elif alt is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif alt is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif alt is str:
            if isinstance(value, str):
                return value
        elif alt is list or typing.get_origin(alt) is list:
            if isinstance(value, (list, tuple)):
                args = typing.get_args(alt)
                items = [_convert(args[0], v) for v in value] if args else list(value)
                if all(v is not _NO for v in items):
                    return items
        elif alt is dict or typing.get_origin(alt) is dict:
            if isinstance(value, Mapping):
                return dict(value)
        elif isinstance(alt, type) and isinstance(value, alt):
            return value
    return _NO


def accepts_text(leaf: Leaf, value) -> bool:
    """Whether a command-line scalar for ``leaf`` is kept as its literal text (a ``str`` key: ``name=2024`` is
    ``"2024"``; ``null`` stays null where the key accepts null)."""
    alts = _alternatives(leaf.type)
    if str not in alts or isinstance(value, (str, list, dict)):
        return False
    return not (value is None and type(None) in alts)


def check_value(value, leaf: Leaf, dotted: str, source: str):
    """``value`` checked against ``leaf`` (type, choices, bounds) and converted; ConfigError naming source and key."""
    out = _convert(leaf.type, value)
    if out is _NO:
        raise ConfigError(f"{source}: config key {dotted!r} has value {value!r} of type {_value_type(value)}, "
                          f"expected {type_name(leaf.type)} (default {leaf.default!r})")
    if out is None:
        return out
    numbers = out if isinstance(out, list) else [out]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ConfigError(f"{source}: config key {dotted!r} = {out!r}: must be a finite number")
    if leaf.choices is not None and out not in leaf.choices:
        raise ConfigError(f"{source}: config key {dotted!r} = {out!r} is not one of: "
                          f"{', '.join(str(c) for c in leaf.choices)}")
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        bad = ((leaf.ge is not None and not out >= leaf.ge) or (leaf.gt is not None and not out > leaf.gt)
               or (leaf.le is not None and not out <= leaf.le) or (leaf.lt is not None and not out < leaf.lt))
        if bad:
            raise ConfigError(f"{source}: config key {dotted!r} = {out!r} is out of range (must be {leaf.bounds()})")
    return out


# -------------------------------------------------------------------------------------------- validation
class KeyHelp:
    """How to explain a key a tree does not have: plain (nearest key), or method-aware (see ConfigSchema)."""

    def unknown(self, dotted: str, source: str, tree: Mapping, value=None) -> str:
        hint = suggest(dotted, tree)
        return f"{source}: unknown config key {dotted!r}" + (f" (did you mean {hint!r}?)" if hint else "")


def suggest(dotted: str, tree: Mapping, cutoff: float = 0.6) -> str | None:
    """The known key closest to ``dotted``: the same leaf name elsewhere, a close dotted key, or a close sibling."""
    known = all_keys(tree)
    prefix, _, leaf = dotted.rpartition(".")
    moved = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if moved:
        return moved[0]
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=cutoff)
    if close:
        return close[0]
    parent = lookup(tree, prefix) if prefix else tree
    if isinstance(parent, Mapping):
        close = difflib.get_close_matches(leaf, [str(k) for k in parent], n=1, cutoff=cutoff - 0.1)
        if close:
            return (prefix + "." if prefix else "") + close[0]
    return None


def check_layer(layer: Mapping, tree: Mapping, source: str, prefix: str = "", explain: KeyHelp | None = None,
                root: Mapping | None = None) -> dict:
    """Check a partial config ``layer`` against ``tree``; return it with values converted. Unknown keys, wrong types,
    values outside ``choices`` or bounds raise ConfigError naming ``source`` and the dotted key."""
    explain = explain or KeyHelp()
    root = tree if root is None else root
    out = {}
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        node = tree.get(key) if isinstance(key, str) else None
        if node is None:
            raise ConfigError(explain.unknown(dotted, source, root, value))
        if node is OPEN:
            out[key] = check_value(value, node, dotted, source)
        elif isinstance(node, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: config key {dotted!r} has value {value!r} of type "
                                  f"{_value_type(value)}, expected mapping (a section)")
            out[key] = check_layer(value, node, source, dotted + ".", explain, root)
        else:
            out[key] = check_value(value, node, dotted, source)
    return out


# ------------------------------------------------------------------------------------------------ options
def parse_options(cls: type, mapping: Mapping | None, mount: str = "", source: str = "config"):
    """An instance of the options dataclass ``cls`` from ``mapping`` (missing keys: the declared defaults), after
    :func:`check_layer`; ``mount`` is the section the options live in (``"compress"``: keys read
    ``compress.<key>`` in messages)."""
    tree = schema_tree(cls)
    if mount:
        checked = check_layer({mount: dict(mapping or {})}, {mount: tree}, source)[mount]
    else:
        checked = check_layer(dict(mapping or {}), tree, source)
    return _build(cls, checked)


def _build(cls: type, values: Mapping):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        kwargs[f.name] = _build(f.default_factory, v) if f.metadata.get("section") else v
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class TrainConfig:
    epochs: int = option(12, "number of training epochs", ge=1)
    batch_size: int = option(2, "images per process and step", ge=1)
    optimizer: str = option("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = option(0.02, "learning rate for the global batch (batch_size × processes); not rescaled", gt=0)
    momentum: float = option(0.9, "SGD momentum", ge=0)
    weight_decay: float = option(1e-4, "weight decay", ge=0)
    lr_schedule: str = option("step", "learning-rate schedule", choices=("step", "cosine"))
    lr_steps: list[int] = option([8, 11], "epochs at which lr *= lr_gamma (step schedule)")
    lr_gamma: float = option(0.1, "lr factor at each of lr_steps", gt=0)
    warmup_iters: int = option(100, "iterations of linear lr warm-up", ge=0)
    warmup_factor: float = option(0.001, "lr factor at the first warm-up iteration", ge=0)
    amp: bool = option(True, "mixed precision (takes effect on CUDA only)")
    grad_clip: float | None = option(None, "clip the gradient norm to this value; null: no clipping", gt=0)
    max_iters_per_epoch: int | None = option(None, "cap on iterations per epoch; null: the whole training split",
                                             ge=1)
    log_interval: int = option(20, "log training losses every N iterations", ge=1)
    eval_interval: int = option(0, "evaluate every N epochs (0: only at the end)", ge=0)
    checkpoint_keep: int = option(2, "epoch checkpoints kept (older ones are deleted)", ge=1)
    num_workers: int = option(2, "data-loader worker processes", ge=0)
    threads: int | None = option(None, "torch threads on CPU; null: torch's default", ge=1)
    tensorboard: bool = option(False, "also write scalars to <output_dir>/tb (needs the tensorboard extra)")


@dataclass
class CompressSchedule:
    """The schedule of compressing an already trained detector (``model.weights``): regularise, compress, fine-tune."""

    enabled: bool = option(False, "train with this schedule instead of train.epochs/lr/warmup_iters/lr_steps and "
                                  "compress.epoch_es (compress a trained detector; compare.py --start trained)")
    epochs: int = option(4, "epochs of the whole compression run (regularised + fine-tuning)", ge=1)
    epoch_es: int = option(2, "Epoch_ES of the compression run: regularised epochs before the prune point (at most: "
                              "target-driven EDP prunes at the end of the epoch that reached its target)", ge=1)
    lr: float | None = option(None, "learning rate of the compression run; null: train.lr", gt=0)
    warmup_iters: int = option(0, "iterations of linear lr warm-up of the compression run", ge=0)
    lr_steps: list[int] | None = option(None, "step schedule: epochs of lr decay in the compression run; null: none")


@dataclass
class CompressOptions:
    """Options every compression method accepts (the baseline ignores them, so that it can share a config with the
    compressed runs). Each method's own options extend this class."""

    flops_target: float | None = option(
        0.4, "backbone FLOPs cut R vs the original network; null: remove only the groups trained to zero",
        gt=0, lt=1)
    epoch_es: int = option(6, "Epoch_ES: regularised epochs before the structural change (PM / prune point; at "
                              "most: target-driven EDP prunes at the end of the epoch that reached its target)", ge=1)
    round_to: int | None = option(None, "round every surviving count to a multiple of this; null: no rounding", ge=1)
    bn_recalib_batches: int = option(16, "after the structural change: re-estimate BatchNorm statistics on this "
                                         "many training batches (0: off)", ge=0)
    schedule: CompressSchedule = section(CompressSchedule, "compression schedule for a trained starting detector")


@dataclass
class BenchmarkConfig:
    enabled: bool = option(True, "measure FPS and memory of the final model")
    device: str | None = option(None, "benchmark device; null: the training device")
    warmup: int = option(3, "warm-up calls before timing", ge=0)
    iters: int = option(10, "timed calls", ge=1)
    peak_memory: bool = option(True, "measure peak memory")


@dataclass
class AugmentConfig:
    hflip: float = option(0.5, "probability of a horizontal flip", ge=0, le=1)
    scale_jitter: list[float] | None = option(None, "[low, high] zoom range around the image centre; null: off")
    brightness_contrast: float = option(0.0, "± limit of brightness and contrast (p = 0.5); 0: off", ge=0, le=1)
    hue_saturation: float = option(0.0, "strength s: hue ±100·s, saturation ±150·s, value ±100·s; 0: off",
                                   ge=0, le=1)
    resize: int | list[int] | None = option(None, "int: longest side; [h, w]: exact size (train and eval); "
                                                  "null: off")
    min_visibility: float = option(0.3, "boxes keeping less than this fraction of their area are dropped",
                                   ge=0, le=1)
    seed: int | None = option(None, "albumentations' own RNG seed (reproducible augmentation)", ge=0)


@dataclass
class DetectionData:
    root: str | None = option(None, "VOC-layout dataset root (Annotations/, JPEGImages/, ImageSets/Main/)")
    train_split: str = option("trainval", "training split (ImageSets/Main/<split>.txt)")
    test_split: str = option("test", "evaluation split")
    classes: list[str] | None = option(None, "class names; null: collected from the training annotations")
    use_difficult: bool = option(False, "train on objects marked difficult")
    on_error: str = option("raise", "unreadable or malformed samples of the training split: raise | skip "
                                    "(see skip_bad_eval_images)", choices=("raise", "skip"))
    skip_bad_eval_images: bool = option(False, "with on_error=skip, also drop bad test images and boxes "
                                               "(changes the benchmark)")
    image_cache: str | bool | None = option(None, "image-check verdicts: null = user cache folder "
                                                  "($EDP_DET_CACHE_DIR, $XDG_CACHE_HOME/edp_det, ~/.cache/edp_det), "
                                                  "false = off, or a folder")
    augment: AugmentConfig = section(AugmentConfig, "training augmentation")


@dataclass
class DetectionModel:
    name: str = option("fasterrcnn", "detector builder", choices=("fasterrcnn",))
    depth: int = option(50, "ResNet depth of the body", choices=(18, 34, 50, 101, 152))
    v2: bool = option(False, "torchvision's fasterrcnn_resnet50_fpn_v2 (depth 50 only)")
    norm: str = option("frozen", "norm layers: frozen (pretrained) | bn (from scratch)", choices=("frozen", "bn"))
    trainable_layers: int = option(5, "trainable ResNet stages (0-5)", ge=0, le=5)
    min_size: int = option(800, "shorter image side after the detector's resize", ge=1)
    max_size: int = option(1333, "longest image side after the detector's resize", ge=1)
    weights: str | None = option(None, "local full-detector checkpoint (class head re-initialised if needed)")
    weights_backbone: str | None = option(None, "local torchvision ImageNet ResNet state dict")
    backbone_checkpoint: str | None = option(None, "a tools/train_cls.py output (compressed or decomposed ResNet)")
    rpn_pre_nms_top_n_train: int = option(2000, "RPN proposals before NMS (training)", ge=1)
    rpn_pre_nms_top_n_test: int = option(1000, "RPN proposals before NMS (test)", ge=1)
    rpn_post_nms_top_n_train: int = option(2000, "RPN proposals after NMS (training)", ge=1)
    rpn_post_nms_top_n_test: int = option(1000, "RPN proposals after NMS (test)", ge=1)
    rpn_batch_size_per_image: int = option(256, "anchors sampled per image for the RPN loss", ge=1)
    box_batch_size_per_image: int = option(512, "ROIs sampled per image for the box-head loss", ge=1)
    box_detections_per_img: int = option(100, "detections kept per image", ge=1)
    box_score_thresh: float = option(0.05, "minimum detection score", ge=0, le=1)
    returned_layers: list[int] | None = option(None, "ResNet stages feeding the FPN; null: [1, 2, 3, 4]")
    fpn_out_channels: int = option(256, "FPN width", ge=1)
    representation_size: int = option(1024, "width of the two-MLP box head", ge=1)
    anchor_sizes: list[int] | None = option(None, "one anchor size per FPN level (+ pool level); null: 32 … 512")
    flops_input_size: list[int] | None = option(None, "[H, W] input for FLOPs and FPS; null: [min_size, min_size]")


@dataclass
class DetectionEval:
    iou_thresh: float = option(0.5, "IoU threshold of a true positive (VOC)", gt=0, lt=1)
    coco: bool = option(True, "also compute COCO-style mAP")
    around_pm: bool = option(False, "also evaluate right before and right after PM (eval_before_pm_* / "
                                    "eval_after_pm_* in metrics_log.jsonl)")
    batch_size: int = option(1, "images per evaluation batch", ge=1)


@dataclass
class ClassificationData:
    root: str | None = option(None, "ImageFolder root holding the train and val splits")
    train_split: str = option("train", "training split folder")
    val_split: str = option("val", "validation split folder")
    image_size: int = option(224, "train: RandomResizedCrop(size); val: Resize(size / 0.875) + CenterCrop(size)",
                             ge=1)
    on_error: str = option("raise", "unreadable images of the training split: raise | skip "
                                    "(see skip_bad_eval_images)", choices=("raise", "skip"))
    skip_bad_eval_images: bool = option(False, "with on_error=skip, also drop bad val images (changes the benchmark)")
    check_images: bool = option(True, "fully decode every image up front, verdicts cached (first run slow on "
                                      "ImageNet)")
    image_cache: str | bool | None = option(None, "image-check verdicts: null = user cache folder "
                                                  "($EDP_DET_CACHE_DIR, $XDG_CACHE_HOME/edp_det, ~/.cache/edp_det), "
                                                  "false = off, or a folder")


@dataclass
class ClassificationModel:
    name: str = option("resnet50", "ResNet builder (resnet18 … resnet152)")
    norm: str = option("bn", "norm layers", choices=("bn", "frozen"))
    weights: str | None = option(None, "local ResNet state dict (fc re-initialised if the class count differs)")


@dataclass
class ClassificationEval:
    batch_size: int = option(64, "images per evaluation batch", ge=1)
    around_pm: bool = option(False, "also evaluate right before and right after PM (eval_before_pm_* / "
                                    "eval_after_pm_* in metrics_log.jsonl)")


@dataclass
class _RunConfig:
    task: str = option("detection", "what the run trains", choices=TASKS)
    method: str = option("edp", "compression method (its options: the compress section)")
    seed: int = option(0, "seed of every RNG (per epoch and process)", ge=0)
    output_dir: str | None = option(None, "output directory; null: --output-dir or runs/<config name>")
    device: str | None = option(None, "training device; null: cuda if available, else cpu")
    train: TrainConfig = section(TrainConfig, "schedule and optimizer")
    compress: CompressOptions = section(CompressOptions, "compression: common options + the method's own")
    benchmark: BenchmarkConfig = section(BenchmarkConfig, "speed and memory measurement of the final model")


@dataclass
class DetectionConfig(_RunConfig):
    data: DetectionData = section(DetectionData, "VOC-format data")
    model: DetectionModel = section(DetectionModel, "Faster R-CNN")
    eval: DetectionEval = section(DetectionEval, "evaluation")


@dataclass
class ClassificationConfig(_RunConfig):
    data: ClassificationData = section(ClassificationData, "ImageFolder data")
    model: ClassificationModel = section(ClassificationModel, "ResNet classifier")
    eval: ClassificationEval = section(ClassificationEval, "evaluation")


_ROOTS = {"detection": DetectionConfig, "classification": ClassificationConfig}


# ------------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class ConfigSchema:
    """The schema of one task: the task's sections, and ``compress`` = the options class of the selected method.

    ``methods``: method name → its options class (a subclass of :class:`CompressOptions`).
    """

    task: str
    methods: Mapping[str, type]
    default_method: str = "edp"

    def __post_init__(self):
        if self.task not in _ROOTS:
            raise ConfigError(f"task={self.task!r} is unknown; choose one of {', '.join(TASKS)}")

    def tree(self, method: str | None = None) -> dict:
        """The full tree for ``method`` (default: :attr:`default_method`)."""
        method = self.default_method if method is None else method
        tree = schema_tree(_ROOTS[self.task])
        tree["task"] = dataclasses.replace(tree["task"], default=self.task)
        tree["method"] = dataclasses.replace(tree["method"], default=self.default_method,
                                             choices=tuple(self.methods))
        compress = schema_tree(self.methods[method])
        compress.help = tree["compress"].help
        tree["compress"] = compress
        return tree

    def defaults(self, method: str | None = None) -> dict:
        return defaults_of(self.tree(method))

    def owners(self, dotted: str) -> list[str]:
        """The methods whose ``compress`` section has the key ``dotted`` (``compress.…``)."""
        return [m for m in self.methods if lookup(self.tree(m), dotted) is not None]

    def renamed(self) -> dict[str, str]:
        """Former dotted key → current dotted key, over every method's options."""
        out = {}
        for m in self.methods:
            out.update(_renamed(self.tree(m)))
        return out

    def explain(self, method: str) -> KeyHelp:
        return _MethodKeyHelp(self, method)

    def check_method(self, value, source: str) -> str:
        return check_value(value, self.tree()["method"], "method", source)


def _leaf_keys(mapping: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in mapping.items():
        out.extend(_leaf_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [f"{prefix}{k}"])
    return out


def _renamed(tree: Mapping, prefix: str = "", base: str = "") -> dict[str, str]:
    out = {}
    for key, node in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(node, Mapping):
            out.update(_renamed(node, dotted + ".", base if base else (dotted + "." if key == "compress" else "")))
        elif isinstance(node, Leaf):
            for old in node.old:
                out[base + old] = dotted
    return out


class _MethodKeyHelp(KeyHelp):
    """Unknown ``compress`` keys name the method, the methods that do have the key, renames and the nearest key."""

    def __init__(self, schema: ConfigSchema, method: str):
        self.schema, self.method = schema, method

    def unknown(self, dotted: str, source: str, tree: Mapping, value=None) -> str:
        renamed = self.schema.renamed()
        if isinstance(value, Mapping):   # a removed section: name the renamed key inside it
            for sub in _leaf_keys(value):
                if f"{dotted}.{sub}" in renamed:
                    return self.unknown(f"{dotted}.{sub}", source, tree)
        if dotted in renamed:
            new = renamed[dotted]
            msg = f"{source}: config key {dotted!r} was renamed {new!r}"
            if lookup(tree, new) is None:
                msg += f" ({self._whose(new)}, not of method {self.method!r})"
            return msg
        moved = {o: n for o, n in renamed.items() if o.startswith(dotted + ".")}
        if moved:
            pairs = ", ".join(f"{o} → {n}" for o, n in list(moved.items())[:3])
            return f"{source}: config key {dotted!r} was removed; its keys are now options of compress ({pairs}, …)"
        if not dotted.startswith("compress."):
            return super().unknown(dotted, source, tree, value)
        owners = self.schema.owners(dotted)
        what = f"is {self._whose(dotted)}, not" if owners else "is not"
        hint = suggest(dotted, {"compress": tree["compress"]}, cutoff=0.5)
        if hint:
            tail = f" (nearest valid key: {hint!r})"
        else:
            tail = f" (its options: {', '.join('compress.' + k for k in tree['compress'])})"
        return f"{source}: config key {dotted!r} {what} an option of method {self.method!r}{tail}"

    def _whose(self, dotted: str) -> str:
        owners = self.schema.owners(dotted)
        return f"an option of method {', '.join(owners)}" if owners else "not an option of any method"


# ------------------------------------------------------------------------------------------------ output
def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def format_config(cfg: Mapping, tree: Mapping, indent: int = 0) -> str:
    """``cfg`` as YAML, each key followed by a comment with its help (and type/choices); loadable again."""
    lines = []
    pad = "  " * indent
    for key, value in cfg.items():
        node = tree.get(key) if isinstance(tree, Mapping) else None
        if isinstance(node, Mapping) and node is not OPEN and isinstance(value, Mapping):
            help_ = getattr(node, "help", "")
            lines.append(f"{pad}{key}:" + (f"  # {help_}" if help_ else ""))
            lines.append(format_config(value, node, indent + 1))
            continue
        text = f"{pad}{key}: {_scalar(value)}"
        if isinstance(node, Leaf):
            text = f"{text:<48}  # {_describe(node)}"
        lines.append(text)
    return "\n".join(line for line in lines if line)


def _describe(leaf: Leaf) -> str:
    extra = []
    if leaf.choices is not None:
        extra.append(" | ".join(str(c) for c in leaf.choices))
    else:
        extra.append(type_name(leaf.type))
    if leaf.bounds():
        extra.append(leaf.bounds())
    return f"{leaf.help} [{'; '.join(extra)}]" if leaf.help else f"[{'; '.join(extra)}]"


def _md_rows(tree: Mapping, prefix: str, base: str = "") -> list[str]:
    """Table rows of ``tree``; ``base``: the section the former names (``old``) are relative to."""
    rows = []
    for key, node in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(node, Mapping) and node is not OPEN:
            rows.extend(_md_rows(node, dotted + ".", base or (dotted + "." if dotted == "compress" else "")))
            continue
        allowed = " \\| ".join(f"`{c}`" for c in node.choices) if node.choices is not None else node.bounds()
        help_ = node.help.replace("|", "\\|")
        if node.old:
            help_ += " (formerly " + ", ".join(f"`{base}{o}`" for o in node.old) + ")"
        kind = type_name(node.type).replace("|", "\\|")
        rows.append(f"| `{dotted}` | {kind} | `{_scalar(node.default)}` | {allowed} | {help_} |")
    return rows


def markdown_reference(schemas: Mapping[str, ConfigSchema], method_help: Mapping[str, str] | None = None) -> str:
    """The reference of every config key, per task (``schemas``: task → its schema) and per method, as Markdown
    (docs/CONFIG.md)."""
    head = "| key | type | default | allowed | help |\n|---|---|---|---|---|"
    out = ["# Configuration reference", "",
           "Generated from the schema (`edp_det/runtime/schema.py` and each method's options class); regenerate "
           "with `python -m edp_det.harness.run_config --markdown > docs/CONFIG.md`. A config file holds only what "
           "differs from its `_base_`; `key=value` arguments override it. `tools/train_det.py --print-config` and "
           "`tools/train_cls.py --print-config` print a resolved config with this help.", "",
           "The `compress` section holds the common options below plus those of the selected `method`. Every "
           "config layer (each file of a `_base_` chain, the command line) is checked against the method selected "
           "so far: a key that method does not declare, or a misspelled one, is an error naming the key, the method "
           "and the nearest valid key. `compress` keys set by layers that selected another method and not declared "
           "by the final method are dropped (logged): a baseline config can inherit EDP's λ from its base, and "
           "`method=slimming` or `tools/compare.py` can run another method from an EDP config. Renamed keys fail "
           "with a message naming the new key (see CHANGELOG.md).", ""]
    tasks = dict(schemas)
    first = next(iter(tasks.values()))
    shared = {k: v for k, v in first.tree().items() if k not in ("data", "model", "eval")}
    shared["compress"] = schema_tree(CompressOptions)
    out += ["## Keys of every task", "", head, *_md_rows(shared, ""), ""]
    for task, schema in tasks.items():
        tree = schema.tree()
        sub = {k: tree[k] for k in ("data", "model", "eval")}
        out += [f"## Task `{task}`", "", head, *_md_rows(sub, ""), ""]
    out += ["## Method options", "", "Besides the common `compress` options above, each method declares:", ""]
    common_keys = set(schema_tree(CompressOptions))
    for name, cls in first.methods.items():
        tree = schema_tree(cls)
        own = {k: v for k, v in tree.items() if k not in common_keys}
        desc = (method_help or {}).get(name, "")
        out += [f"### `method: {name}`" + (f" — {desc}" if desc else ""), ""]
        out += [head, *_md_rows(own, "compress.", "compress."), ""] if own else ["No options of its own.", ""]
    return "\n".join(out).rstrip() + "\n"
