"""Model registry (where the parts of a detector live: :mod:`edp_det.ops.adapter`).

Models are built by registered name (never ``eval``): ``build_model("resnet50", num_classes=10)``,
``build_model("fasterrcnn", depth=50, num_classes=21, min_size=256, max_size=256)``. The builder name and its
keyword arguments are stamped on the model as ``model.edp_arch`` so that :func:`edp_det.save_compressed` can
rebuild the same skeleton later. Nothing is ever downloaded: weights come from local files only
(:func:`load_backbone_weights`, :func:`load_detector_weights`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.adapter import body_of, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["MODEL_REGISTRY", "register_model", "build_model", "describe_model", "infer_arch", "arch_differences",
           "load_backbone_weights", "load_detector_weights", "read_state_dict", "check_saved_detector"]

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODEL_REGISTRY[name] = fn
        return fn
    return deco


def _resnet_builder(depth: int):
    def build(num_classes: int = 1000, norm: str = "bn") -> nn.Module:
        norm_layer = {"bn": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}.get(norm)
        if norm_layer is None:
            raise ValueError(f"norm must be 'bn' or 'frozen', got {norm!r}")
        return getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes,
                                                             norm_layer=norm_layer)
    return build


for _d in (18, 34, 50, 101, 152):
    register_model(f"resnet{_d}")(_resnet_builder(_d))


@register_model("fasterrcnn")
def build_fasterrcnn(num_classes: int = 91, depth: int = 50, v2: bool = False, norm: str = "frozen",
                     trainable_layers: int = 5, min_size: int | list = 800, max_size: int = 1333,
                     image_mean: list | None = None, image_std: list | None = None,
                     rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                     rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                     rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512,
                     box_detections_per_img: int = 100, box_score_thresh: float = 0.05,
                     box_nms_thresh: float = 0.5, returned_layers: list | None = None,
                     fpn_out_channels: int = 256, representation_size: int = 1024,
                     anchor_sizes: list | None = None, aspect_ratios: list | None = None,
                     rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                     rpn_positive_fraction: float = 0.5, rpn_score_thresh: float = 0.0,
                     box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                     box_positive_fraction: float = 0.25, bbox_reg_weights: list | None = None,
                     size_divisible: int = 32, fixed_size: list | None = None) -> nn.Module:
    """torchvision Faster R-CNN with a ResNet-FPN backbone (no weights; see the load_* helpers).

    ``v2=True`` gives ``fasterrcnn_resnet50_fpn_v2`` (depth must be 50). ``norm``: ``"frozen"`` (torchvision's
    FrozenBatchNorm2d, for fine-tuning pretrained weights) or ``"bn"`` (BatchNorm2d, for training from scratch).
    ``min_size``/``max_size``: the GeneralizedRCNNTransform resize (``min_size`` may be a list: multi-scale
    training). ``trainable_layers``: 0–5 ResNet stages trained. Lighter detectors for small images / CPUs (v1 only):
    ``returned_layers`` (ResNet stages feeding the FPN, default [1, 2, 3, 4]), ``fpn_out_channels`` (256),
    ``representation_size`` of the two-MLP box head (1024), ``anchor_sizes`` (per pyramid level incl. the extra
    pool level, an int or a list of ints; default 32..512) and ``aspect_ratios`` (a list for every level, or one
    list per level; default [0.5, 1.0, 2.0]). The remaining keywords are torchvision's ``FasterRCNN`` settings of
    the same name (``bbox_reg_weights`` default [10, 10, 5, 5]; ``size_divisible``, ``fixed_size``: the transform).
    """
    norm_layer = {"bn": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}.get(norm)
    if norm_layer is None:
        raise ValueError(f"model.norm must be 'bn' or 'frozen', got {norm!r}")
    kw = dict(min_size=min_size, max_size=max_size, image_mean=image_mean, image_std=image_std,
              rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
              rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
              rpn_batch_size_per_image=rpn_batch_size_per_image, box_batch_size_per_image=box_batch_size_per_image,
              box_detections_per_img=box_detections_per_img, box_score_thresh=box_score_thresh,
              box_nms_thresh=box_nms_thresh, rpn_nms_thresh=rpn_nms_thresh, rpn_fg_iou_thresh=rpn_fg_iou_thresh,
              rpn_bg_iou_thresh=rpn_bg_iou_thresh, rpn_positive_fraction=rpn_positive_fraction,
              rpn_score_thresh=rpn_score_thresh, box_fg_iou_thresh=box_fg_iou_thresh,
              box_bg_iou_thresh=box_bg_iou_thresh, box_positive_fraction=box_positive_fraction,
              bbox_reg_weights=None if bbox_reg_weights is None else tuple(float(w) for w in bbox_reg_weights),
              size_divisible=size_divisible, fixed_size=None if fixed_size is None else tuple(fixed_size))
    if isinstance(min_size, (list, tuple)):
        kw["min_size"] = tuple(int(v) for v in min_size)
    if v2:
        if depth != 50:
            raise ValueError(f"model.v2 requires depth 50, got {depth}")
        fixed = {"returned_layers": (returned_layers, [1, 2, 3, 4]), "fpn_out_channels": (fpn_out_channels, 256),
                 "representation_size": (representation_size, 1024),
                 "anchor_sizes": (anchor_sizes, [32, 64, 128, 256, 512]), "aspect_ratios": (aspect_ratios, [0.5, 1, 2])}
        for key, (val, default) in fixed.items():
            if val is not None and _plain(val) != default and _plain(val) != [[v] for v in default]:
                raise ValueError(f"model.{key}={val!r} is not available with model.v2 (torchvision's v2 heads are "
                                 "fixed); use v2=false")
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
        kw_v2 = {k: v for k, v in kw.items() if v is not None}
        model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,  # without
                                           trainable_backbone_layers=None if trainable_layers == 5 else  # weights
                                           trainable_layers, **kw_v2)                  # torchvision trains all 5
        if norm == "bn":
            logger.warning("fasterrcnn v2 uses BatchNorm2d in its body already; norm=%r ignored", norm)
        return model
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"model.depth must be one of 18, 34, 50, 101, 152, got {depth}")
    returned = list(returned_layers) if returned_layers else [1, 2, 3, 4]
    if not returned or any(r not in (1, 2, 3, 4) for r in returned) or sorted(set(returned)) != returned:
        raise ValueError(f"model.returned_layers must be an increasing subset of [1, 2, 3, 4], got {returned_layers}")
    default_head = returned == [1, 2, 3, 4] and fpn_out_channels == 256 and representation_size == 1024 \
        and anchor_sizes is None and aspect_ratios is None
    if default_head:
        backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=norm_layer,
                                       trainable_layers=trainable_layers)
        return FasterRCNN(backbone, num_classes=num_classes, **kw)
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, p in resnet.named_parameters():
        if all(not name.startswith(t) for t in trainable):
            p.requires_grad_(False)
    stage_out = resnet.inplanes // 8  # channels of layer1 output
    in_list = [stage_out * 2 ** (r - 1) for r in returned]
    backbone = BackboneWithFPN(resnet, {f"layer{r}": str(i) for i, r in enumerate(returned)}, in_list,
                               fpn_out_channels)
    n_levels = len(returned) + 1  # + LastLevelMaxPool
    sizes = list(anchor_sizes) if anchor_sizes else [32 * 2 ** i for i in range(n_levels)]
    if len(sizes) != n_levels:
        raise ValueError(f"model.anchor_sizes needs {n_levels} sizes (one per FPN level), got {anchor_sizes}")
    ratios = list(aspect_ratios) if aspect_ratios else [0.5, 1.0, 2.0]
    if not all(isinstance(r, (list, tuple)) for r in ratios):
        ratios = [ratios] * n_levels
    if len(ratios) != n_levels:
        raise ValueError(f"model.aspect_ratios needs one list, or one list per FPN level ({n_levels}), got "
                         f"{aspect_ratios}")
    anchors = AnchorGenerator(tuple(tuple(int(v) for v in s_) if isinstance(s_, (list, tuple)) else (int(s_),)
                                    for s_ in sizes), tuple(tuple(float(v) for v in r) for r in ratios))
    rpn_head = RPNHead(fpn_out_channels, anchors.num_anchors_per_location()[0])
    roi_pool = MultiScaleRoIAlign([str(i) for i in range(len(returned))], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_out_channels * 7 * 7, representation_size)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as _Pred
    return FasterRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head,
                      box_roi_pool=roi_pool, box_head=box_head,
                      box_predictor=_Pred(representation_size, num_classes), **kw)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; stamps ``model.edp_arch = {"name", "kwargs"}``."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_REGISTRY)}")
    try:
        model = MODEL_REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name!r}: {e}") from None
    model.edp_arch = {"name": name, "kwargs": dict(kwargs)}
    return model


_RESNET_DEPTHS = {(BasicBlock, (2, 2, 2, 2)): 18, (BasicBlock, (3, 4, 6, 3)): 34, (Bottleneck, (3, 4, 6, 3)): 50,
                  (Bottleneck, (3, 4, 23, 3)): 101, (Bottleneck, (3, 8, 36, 3)): 152}
# builder keywords that do not change what the model computes: never reported as a contradiction
_UNCHECKED = ("trainable_layers",)
_V2_FIXED = ("returned_layers", "fpn_out_channels", "representation_size", "anchor_sizes", "aspect_ratios")


def _resnet_depth(stages: nn.Module, what: str) -> int:
    """Depth of the ResNet whose stages ``layer1..`` are attributes of ``stages`` (a ResNet or a detector body that
    may stop before layer4: then the first depth with matching leading stages, which builds the same body)."""
    counts = tuple(len(getattr(stages, f"layer{i}")) for i in range(1, 5) if hasattr(stages, f"layer{i}"))
    block = type(getattr(stages, "layer1")[0]) if hasattr(stages, "layer1") else None
    for (blk, full), depth in _RESNET_DEPTHS.items():
        if blk is block and full[:len(counts)] == counts:
            return depth
    raise ValueError(f"cannot identify the ResNet variant of the {what} "
                     f"({getattr(block, '__name__', None)}, stages {list(counts)}); pass arch= explicitly")


def _norm_kind(module: nn.Module) -> str | None:
    """"bn" or "frozen" after the first norm layer of ``module``; None if it holds none (e.g. all folded)."""
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            return "frozen"
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
    return None


def _plain(v):
    """Tuples → lists, numbers kept: the form the builders take and the file format stores."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _trainable_stages(body: nn.Module) -> int:
    """How many ResNet stages (from layer4 down to the stem) hold trainable parameters, as ``trainable_layers``."""
    n = 0
    for stage in ("layer4", "layer3", "layer2", "layer1", "conv1"):
        mod = getattr(body, stage, None)
        if mod is None:
            n += 1 if n == 0 else 0   # a stage the body does not hold (returned_layers without 4): not frozen
            continue
        if not any(p.requires_grad for p in mod.parameters()):
            break
        n += 1
    return min(n, 5)


def _describe_fasterrcnn(model: nn.Module) -> dict:
    """Builder keywords of :func:`build_fasterrcnn` read from a torchvision Faster R-CNN with a ResNet-FPN
    backbone. Raises ValueError naming the part the builder cannot reproduce."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    def unsupported(what, value):
        return ValueError(f"cannot describe this {type(model).__name__}: {what} = {value!r} is not something "
                          "edp_det's 'fasterrcnn' builder makes; pass arch= for a registered builder that does")

    rh, rpn, t, bb = model.roi_heads, model.rpn, model.transform, model.backbone
    if rh.has_mask() or rh.has_keypoint():
        raise unsupported("roi_heads", "mask/keypoint heads")
    if not isinstance(bb, BackboneWithFPN) or not hasattr(bb.body, "conv1"):
        raise unsupported("backbone", type(bb).__name__)
    if not isinstance(bb.fpn.extra_blocks, LastLevelMaxPool):
        raise unsupported("backbone.fpn.extra_blocks", type(bb.fpn.extra_blocks).__name__)
    if getattr(t, "_skip_resize", False):
        raise unsupported("transform._skip_resize", True)
    v2 = isinstance(rh.box_head, FastRCNNConvFCHead)
    if not v2 and not isinstance(rh.box_head, TwoMLPHead):
        raise unsupported("roi_heads.box_head", type(rh.box_head).__name__)
    returned = sorted(int(k[len("layer"):]) for k in bb.body.return_layers)
    pool = rh.box_roi_pool
    if list(pool.featmap_names) != [str(i) for i in range(len(returned))] or tuple(pool.output_size) != (7, 7) \
            or pool.sampling_ratio != 2:
        raise unsupported("roi_heads.box_roi_pool", (list(pool.featmap_names), pool.output_size, pool.sampling_ratio))
    if tuple(rpn.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
        raise unsupported("rpn.box_coder.weights", rpn.box_coder.weights)
    sizes = [list(s_) if len(s_) > 1 else s_[0] for s_ in _plain(rpn.anchor_generator.sizes)]
    ratios = _plain(rpn.anchor_generator.aspect_ratios)
    ratios = ratios[0] if all(r == ratios[0] for r in ratios) else ratios
    min_size = [int(v) for v in t.min_size]
    kw = {"num_classes": rh.box_predictor.cls_score.out_features, "depth": _resnet_depth(bb.body, "detector body"),
          "v2": v2, "trainable_layers": _trainable_stages(bb.body),
          "min_size": min_size[0] if len(min_size) == 1 else min_size, "max_size": int(t.max_size),
          "image_mean": [float(v) for v in t.image_mean], "image_std": [float(v) for v in t.image_std],
          "size_divisible": int(t.size_divisible), "fixed_size": _plain(t.fixed_size),
          "rpn_pre_nms_top_n_train": rpn._pre_nms_top_n["training"],
          "rpn_pre_nms_top_n_test": rpn._pre_nms_top_n["testing"],
          "rpn_post_nms_top_n_train": rpn._post_nms_top_n["training"],
          "rpn_post_nms_top_n_test": rpn._post_nms_top_n["testing"],
          "rpn_nms_thresh": float(rpn.nms_thresh), "rpn_score_thresh": float(rpn.score_thresh),
          "rpn_fg_iou_thresh": float(rpn.proposal_matcher.high_threshold),
          "rpn_bg_iou_thresh": float(rpn.proposal_matcher.low_threshold),
          "rpn_batch_size_per_image": rpn.fg_bg_sampler.batch_size_per_image,
          "rpn_positive_fraction": float(rpn.fg_bg_sampler.positive_fraction),
          "box_score_thresh": float(rh.score_thresh), "box_nms_thresh": float(rh.nms_thresh),
          "box_detections_per_img": rh.detections_per_img,
          "box_fg_iou_thresh": float(rh.proposal_matcher.high_threshold),
          "box_bg_iou_thresh": float(rh.proposal_matcher.low_threshold),
          "box_batch_size_per_image": rh.fg_bg_sampler.batch_size_per_image,
          "box_positive_fraction": float(rh.fg_bg_sampler.positive_fraction),
          "bbox_reg_weights": [float(w) for w in rh.box_coder.weights],
          "returned_layers": returned, "fpn_out_channels": bb.out_channels,
          "representation_size": rh.box_predictor.cls_score.in_features,
          "anchor_sizes": sizes, "aspect_ratios": ratios}
    norm = _norm_kind(bb.body)
    if norm is not None and not v2:
        kw["norm"] = norm
    if v2:   # torchvision's fixed v2 heads: the builder takes no such keywords
        v2_fixed = _fasterrcnn_effective({"v2": True})
        for key in _V2_FIXED:
            if kw[key] != v2_fixed[key]:
                raise unsupported(key + " (v2)", kw[key])
            del kw[key]
    return {"name": "fasterrcnn", "kwargs": kw}


def _fasterrcnn_effective(kwargs: dict) -> dict:
    """``kwargs`` of :func:`build_fasterrcnn` with every default written out, in the form
    :func:`_describe_fasterrcnn` reads back (so the two compare key by key)."""
    import inspect

    kw = {k: p.default for k, p in inspect.signature(build_fasterrcnn).parameters.items()}
    kw.update(kwargs)
    n_levels = len(kw["returned_layers"] or [1, 2, 3, 4]) + 1
    defaults = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                "returned_layers": [1, 2, 3, 4], "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
                "anchor_sizes": [32 * 2 ** i for i in range(n_levels)], "aspect_ratios": [0.5, 1.0, 2.0]}
    for key, value in defaults.items():
        if kw.get(key) is None:
            kw[key] = value
    out = {k: _plain(v) for k, v in kw.items()}
    for key in ("image_mean", "image_std", "bbox_reg_weights"):
        out[key] = [float(v) for v in out[key]]
    if isinstance(out["min_size"], list) and len(out["min_size"]) == 1:
        out["min_size"] = out["min_size"][0]
    out["anchor_sizes"] = [s_[0] if isinstance(s_, list) and len(s_) == 1 else s_ for s_ in out["anchor_sizes"]]
    r = [[float(v) for v in x] if isinstance(x, list) else float(x) for x in out["aspect_ratios"]]
    out["aspect_ratios"] = r[0] if r and isinstance(r[0], list) and all(x == r[0] for x in r) else r
    if out.get("v2"):
        out.pop("norm", None)
    return out


def infer_arch(model: nn.Module) -> dict | None:
    """``{"name", "kwargs"}`` read from the model itself — every builder keyword that changes what it computes —
    for a torchvision ResNet classifier or a torchvision Faster R-CNN with a ResNet-FPN backbone (v1 or v2, decomposed
    and pruned ones included: the module shapes travel in the file's spec). None for other model types.
    Raises ValueError for a Faster R-CNN/ResNet the registry's builders cannot reproduce."""
    model = unwrap_model(model)
    if isinstance(model, ResNet):
        kw = {"num_classes": model.fc.out_features}
        norm = _norm_kind(model)
        if norm is not None:
            kw["norm"] = norm
        return {"name": f"resnet{_resnet_depth(model, 'ResNet')}", "kwargs": kw}
    if isinstance(model, FasterRCNN):
        return _describe_fasterrcnn(model)
    return None


def _effective(name: str, kwargs: dict) -> dict:
    if name == "fasterrcnn":
        return _fasterrcnn_effective(kwargs)
    out = {"norm": "bn"} if name.startswith("resnet") else {}
    out.update({k: _plain(v) for k, v in kwargs.items()})
    return out


def arch_differences(arch: dict, model_arch: dict, given_only: bool = False) -> list[str]:
    """``"field: arch value vs model value"`` for every setting where ``arch`` would build something other than
    ``model_arch`` (both ``{"name", "kwargs"}``; defaults of the builder filled in). ``given_only``: compare only
    the keywords ``arch`` names (the others are to be completed from the model)."""
    if arch["name"] != model_arch["name"]:
        return [f"name: {arch['name']!r} vs {model_arch['name']!r}"]
    mine, theirs = _effective(arch["name"], arch["kwargs"]), _effective(model_arch["name"], model_arch["kwargs"])
    return [f"{k}: {mine.get(k)!r} vs {v!r}" for k, v in theirs.items()
            if k not in _UNCHECKED and k in model_arch["kwargs"] and (k in arch["kwargs"] or not given_only)
            and mine.get(k) != v]


def describe_model(model: nn.Module, arch: dict | None = None) -> dict:
    """``{"name", "kwargs"}`` that rebuilds the skeleton of ``model`` with :func:`build_model`.

    Read from the model itself for torchvision ResNets and ResNet-FPN Faster R-CNNs (:func:`infer_arch`), so a
    detector built directly with torchvision (``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
    num_classes=3, min_size=128)``) needs no ``arch``. ``arch`` (``{"name", "kwargs"}``, or the keyword dict alone) is
    completed from the model; a field that contradicts the model raises ValueError naming it. Without ``arch``
    the ``model.edp_arch`` stamp of :func:`build_model` is used, corrected where the model was changed after it was
    built. Other model types need ``arch`` (or the stamp).
    """
    model = unwrap_model(model)
    stamp = getattr(model, "edp_arch", None)
    try:
        inferred = infer_arch(model)
    except ValueError:
        if arch is None and stamp is None:
            raise
        inferred = None   # a registered builder's own variant: the given arch or the stamp says how to build it
    if arch is not None:
        if not isinstance(arch, dict):
            raise ValueError(f"arch must be a dict {{'name': ..., 'kwargs': {{...}}}}, got {type(arch).__name__}")
        if "name" not in arch and "kwargs" not in arch:
            if inferred is None:
                raise ValueError("arch without 'name': the model's builder cannot be read from a "
                                 f"{type(model).__name__}; pass arch={{'name': ..., 'kwargs': {{...}}}}")
            arch = {"name": inferred["name"], "kwargs": arch}
        if not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs", {}), dict):
            raise ValueError(f"arch must hold 'name' (str) and 'kwargs' (dict), got {arch!r}")
        given = {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}
        if inferred is None or given["name"] != inferred["name"]:   # another builder: save_compressed checks
            return given                                            # that it rebuilds the model's structure
        diffs = arch_differences(given, inferred, given_only=True)
        if diffs:
            raise ValueError("arch contradicts the model (arch vs model): " + "; ".join(diffs))
        return {"name": given["name"], "kwargs": {**inferred["kwargs"], **given["kwargs"]}}
    if stamp is not None:
        stamp = {"name": stamp["name"], "kwargs": dict(stamp["kwargs"])}
        if inferred is None or inferred["name"] != stamp["name"]:   # another registered builder
            return stamp
        diffs = [d.split(":")[0] for d in arch_differences(stamp, inferred)]
        if diffs:
            logger.info("model changed after build_model (%s); its current settings are recorded", ", ".join(diffs))
        stamp["kwargs"].update({k: inferred["kwargs"][k] for k in diffs})
        return stamp
    if inferred is None:
        raise ValueError(f"cannot describe a {type(model).__name__} built outside edp_det.build_model; build it with "
                         "edp_det.build_model(...) or pass arch={'name': ..., 'kwargs': {...}}")
    return inferred


def read_state_dict(path, what: str, obj=None) -> dict:
    """The state dict in a local file (plain, or under 'model' / 'state_dict' / 'model_state'); ``what`` names
    the config field in the error message. ``obj``: the file's content when it is already loaded."""
    from edp_det.runtime.checkpoint import load_checkpoint

    obj = load_checkpoint(path) if obj is None else obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: {what} must be a state_dict (name -> tensor), found {type(obj).__name__}")
    return obj


def load_backbone_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a torchvision ImageNet ResNet checkpoint (local file) into the detector's ResNet body.

    The classifier ``fc`` is dropped, and so are the stages the body does not hold (``returned_layers`` without
    ``4``). Returns the body keys that were not in the file (buffers such as ``num_batches_tracked`` only). A file of
    another ResNet depth (a shape, a block the body lacks or a body weight the file lacks) raises a ValueError naming
    the key.
    """
    sd = read_state_dict(path, "model.weights_backbone")
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    body = body_of(model)
    own = body.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{path}: model.weights_backbone key {k!r} has shape {tuple(v.shape)}, the body "
                             f"expects {tuple(own[k].shape)} (different ResNet depth?)")
    unexpected = [k for k in sd if k not in own]
    if len(unexpected) == len(sd):
        raise ValueError(f"{path}: model.weights_backbone holds no ResNet body keys (e.g. {next(iter(sd), None)!r})")
    stages = {k.split(".", 1)[0] for k in own}
    extra = [k for k in unexpected if k.split(".", 1)[0] in stages and not k.endswith("num_batches_tracked")]
    missing = [k for k in own if k not in sd]
    lacking = [k for k in missing if not k.endswith("num_batches_tracked")]
    if extra or lacking:
        what = f"has {extra[0]!r}, which the body does not" if extra else f"lacks the body's {lacking[0]!r}"
        raise ValueError(f"{path}: model.weights_backbone {what} ({len(extra)} extra, {len(lacking)} missing "
                         f"keys): a ResNet of another depth than model.depth={_resnet_depth(body, 'detector body')}?")
    body.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    logger.info("loaded backbone weights from %s (%d missing keys)", path, len(missing))
    return missing


def load_detector_weights(model: nn.Module, path: str | Path) -> None:
    """Load a full Faster R-CNN checkpoint (e.g. torchvision's COCO one, local file). If the class count differs
    the box predictor is re-initialised (and logged); any other mismatch raises a ValueError naming the key.
    A ``model_final.pt`` written by edp-det (architecture spec + state dict) loads when it holds the uncompressed
    detector of the same architecture (:func:`check_saved_detector`)."""
    from edp_det.runtime.checkpoint import load_checkpoint

    obj = load_checkpoint(path)
    check_saved_detector(obj, model, path)
    sd = read_state_dict(path, "model.weights", obj=obj)
    own = model.state_dict()
    head_keys = [k for k in sd if k.startswith("roi_heads.box_predictor.")]
    if head_keys and any(k in own and own[k].shape != sd[k].shape for k in head_keys):
        logger.warning("%s: class count differs (%s vs %s); box predictor re-initialised", path,
                       tuple(sd["roi_heads.box_predictor.cls_score.weight"].shape),
                       tuple(own["roi_heads.box_predictor.cls_score.weight"].shape))
        sd = {k: v for k, v in sd.items() if k not in head_keys}
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{path}: model.weights key {k!r} has shape {tuple(v.shape)}, model expects "
                             f"{tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in unexpected]
    if unexpected:
        raise ValueError(f"{path}: model.weights has keys the model lacks, e.g. {unexpected[:3]}")
    logger.info("loaded detector weights from %s (%d missing keys)", path, len(missing))


#: builder arguments that change a Faster R-CNN's weights (the others: resize, proposal and detection counts)
_WEIGHT_SHAPING_KWARGS = ("depth", "v2", "norm", "returned_layers", "fpn_out_channels", "representation_size",
                          "anchor_sizes")
_PLAIN_SPEC_TYPES = ("conv2d", "batchnorm2d", "frozenbn", "linear", "identity")


def check_saved_detector(obj, model: nn.Module, path) -> None:
    """ValueError (naming ``model.weights`` and the first difference) when ``obj``, the content of an edp-det model
    file (``arch`` + ``spec`` + ``state_dict``), is not an uncompressed detector of ``model``'s architecture; any
    other file content passes unchecked."""
    if not (isinstance(obj, dict) and isinstance(obj.get("arch"), dict) and isinstance(obj.get("spec"), dict)):
        return
    arch, own = obj["arch"], getattr(model, "edp_arch", None) or {"name": "fasterrcnn", "kwargs": {}}
    if arch.get("name") != own["name"]:
        raise ValueError(f"{path}: model.weights holds a {arch.get('name')!r} model, the config builds "
                         f"{own['name']!r}")
    file_kw, own_kw = arch.get("kwargs") or {}, own["kwargs"]
    for k in _WEIGHT_SHAPING_KWARGS:
        if k in file_kw and k in own_kw and file_kw[k] != own_kw[k]:
            raise ValueError(f"{path}: model.weights has another architecture than the config's model "
                             f"(model.{k}: {file_kw[k]!r} in the file, {own_kw[k]!r} in the config)")
    modules = dict(model.named_modules())
    for name, d in obj["spec"].items():
        kind, own_m = d.get("type"), modules.get(name)
        pruned = kind == "conv2d" and isinstance(own_m, nn.Conv2d) and name.startswith("backbone.") and \
            (d.get("in"), d.get("out")) != (own_m.in_channels, own_m.out_channels)
        if kind not in _PLAIN_SPEC_TYPES or pruned:
            what = f"is {kind!r}" if not pruned else f"has {d.get('in')}->{d.get('out')} channels, the config's " \
                f"{own_m.in_channels}->{own_m.out_channels}"
            raise ValueError(f"{path}: model.weights is a compressed model (layer {name} {what}); start from the "
                             "uncompressed detector (e.g. the baseline run's model_final.pt)")


def replace_box_predictor(model: nn.Module, num_classes: int) -> None:
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
