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

from edp_det.ops.adapter import body_of

logger = logging.getLogger(__name__)

__all__ = ["MODEL_REGISTRY", "register_model", "build_model", "describe_model", "load_backbone_weights",
           "load_detector_weights", "read_state_dict", "check_saved_detector"]

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
                     trainable_layers: int = 5, min_size: int = 800, max_size: int = 1333,
                     image_mean: list | None = None, image_std: list | None = None,
                     rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                     rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                     rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512,
                     box_detections_per_img: int = 100, box_score_thresh: float = 0.05,
                     box_nms_thresh: float = 0.5, returned_layers: list | None = None,
                     fpn_out_channels: int = 256, representation_size: int = 1024,
                     anchor_sizes: list | None = None) -> nn.Module:
    """torchvision Faster R-CNN with a ResNet-FPN backbone (no weights; see the load_* helpers).

    ``v2=True`` gives ``fasterrcnn_resnet50_fpn_v2`` (depth must be 50). ``norm``: ``"frozen"`` (torchvision's
    FrozenBatchNorm2d, for fine-tuning pretrained weights) or ``"bn"`` (BatchNorm2d, for training from scratch).
    ``min_size``/``max_size``: the GeneralizedRCNNTransform resize. ``trainable_layers``: 0–5 ResNet stages trained.
    Lighter detectors for small images / CPUs (v1 only): ``returned_layers`` (ResNet stages feeding the FPN,
    default [1, 2, 3, 4]), ``fpn_out_channels`` (256), ``representation_size`` of the two-MLP box head (1024) and
    ``anchor_sizes`` (one size per pyramid level incl. the extra pool level; default 32..512).
    """
    norm_layer = {"bn": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}.get(norm)
    if norm_layer is None:
        raise ValueError(f"model.norm must be 'bn' or 'frozen', got {norm!r}")
    kw = dict(min_size=min_size, max_size=max_size, image_mean=image_mean, image_std=image_std,
              rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
              rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
              rpn_batch_size_per_image=rpn_batch_size_per_image, box_batch_size_per_image=box_batch_size_per_image,
              box_detections_per_img=box_detections_per_img, box_score_thresh=box_score_thresh,
              box_nms_thresh=box_nms_thresh)
    if v2:
        if depth != 50:
            raise ValueError(f"model.v2 requires depth 50, got {depth}")
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
        kw_v2 = {k: v for k, v in kw.items() if v is not None}
        model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,
                                           trainable_backbone_layers=trainable_layers, **kw_v2)
        if norm == "bn":
            logger.warning("fasterrcnn v2 uses BatchNorm2d in its body already; norm=%r ignored", norm)
        return model
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"model.depth must be one of 18, 34, 50, 101, 152, got {depth}")
    returned = list(returned_layers) if returned_layers else [1, 2, 3, 4]
    if not returned or any(r not in (1, 2, 3, 4) for r in returned) or sorted(set(returned)) != returned:
        raise ValueError(f"model.returned_layers must be an increasing subset of [1, 2, 3, 4], got {returned_layers}")
    default_head = returned == [1, 2, 3, 4] and fpn_out_channels == 256 and representation_size == 1024 \
        and anchor_sizes is None
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
    anchors = AnchorGenerator(tuple((int(s_),) for s_ in sizes), ((0.5, 1.0, 2.0),) * n_levels)
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


def describe_model(model: nn.Module) -> dict:
    """``{"name", "kwargs"}`` to rebuild the skeleton of ``model`` (stamped by build_model, or inferred for
    plain torchvision ResNets)."""
    arch = getattr(model, "edp_arch", None)
    if arch is not None:
        return {"name": arch["name"], "kwargs": dict(arch["kwargs"])}
    if isinstance(model, ResNet):
        counts = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
        block = type(model.layer1[0])
        table = {(BasicBlock, (2, 2, 2, 2)): 18, (BasicBlock, (3, 4, 6, 3)): 34,
                 (Bottleneck, (3, 4, 6, 3)): 50, (Bottleneck, (3, 4, 23, 3)): 101,
                 (Bottleneck, (3, 8, 36, 3)): 152}
        depth = table.get((block, tuple(counts)))
        if depth is None:
            raise ValueError(f"cannot identify ResNet variant ({block.__name__}, {counts}); pass arch= explicitly")
        norm = "frozen" if isinstance(model.bn1, FrozenBatchNorm2d) else "bn"
        return {"name": f"resnet{depth}", "kwargs": {"num_classes": model.fc.out_features, "norm": norm}}
    raise ValueError(f"cannot describe a {type(model).__name__} built outside edp_det.build_model; build it with "
                     "edp_det.build_model(...) or pass arch={'name': ..., 'kwargs': {...}}")


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

    The classifier ``fc`` is dropped. Returns the body keys that were not in the file. Shape mismatches raise a
    ValueError naming the key.
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
    missing = [k for k in own if k not in sd]
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
