"""Where the parts edp-det compresses live in the supported models, and what a compression scope covers.

Supported models:
  * torchvision ``ResNet`` classifiers: the whole model is the ResNet body (module names have no prefix);
  * torchvision Faster R-CNN (``FasterRCNN``, v1 and v2, with a ResNet-FPN backbone): the ResNet body is the
    backbone's ``body`` (an ``IntermediateLayerGetter``), the FPN the backbone's ``fpn``, the RPN head ``rpn.head``.

Scopes (``compress.scope``):
  * ``"backbone"``: the ResNet body (a classifier: the whole model);
  * ``"detector"``: in a detector additionally the FPN convs and the RPN head's shared conv (its prediction convs
    ``cls_logits`` / ``bbox_pred`` stay plain).

Every other module asks this one for module names, prefixes and the "is this a detector" test.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import ResNet

__all__ = ["SCOPES", "BODY", "BODY_PREFIX", "FPN", "RPN", "ROI_HEADS", "DETECTOR_PARTS", "unwrap_model",
           "is_detector", "find_resnet_body", "body_of", "body_input", "check_scope", "scope_extra_modules",
           "scope_prefixes", "scope_of", "under", "in_scope", "short_body_name"]

SCOPES = ("backbone", "detector")

BODY = "backbone.body"          # the ResNet body of a detector
BODY_PREFIX = BODY + "."
FPN = "backbone.fpn"
RPN = "rpn"
RPN_HEAD_CONV = "rpn.head.conv"
ROI_HEADS = "roi_heads"
DETECTOR_PARTS = (BODY, FPN, RPN, ROI_HEADS)   # FLOPs are reported per part for detectors

_DETECTOR_ATTRS = ("backbone", "rpn", "roi_heads", "transform")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_detector(model: nn.Module) -> bool:
    """A torchvision two-stage detector (``GeneralizedRCNN``: transform, backbone, RPN, ROI heads)."""
    model = unwrap_model(model)
    return all(hasattr(model, a) for a in _DETECTOR_ATTRS)


def find_resnet_body(model: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(prefix, body)``: ``("", model)`` for a ResNet classifier, ``(BODY_PREFIX, body)`` for a detector
    whose backbone body is a ResNet. ``TypeError`` for anything else."""
    model = unwrap_model(model)
    if isinstance(model, ResNet):
        return "", model
    backbone = getattr(model, "backbone", None)
    body = getattr(backbone, "body", None)
    if body is not None and all(hasattr(body, n) for n in ("conv1", "layer1", "layer4")):
        return BODY_PREFIX, body
    raise TypeError(f"unsupported model {type(model).__name__}: expected a torchvision ResNet or a torchvision "
                    f"detector whose {BODY} is a ResNet (e.g. fasterrcnn_resnet50_fpn)")


def body_of(model: nn.Module) -> nn.Module:
    """The module that runs on image tensors and holds the ResNet layers: a detector's backbone body (its
    backbone when it has no body), otherwise the model itself."""
    model = unwrap_model(model)
    if is_detector(model):
        return getattr(model.backbone, "body", model.backbone)
    return model


def body_input(model: nn.Module, images):
    """What :func:`body_of` sees for ``images``: a detector's transform output (resized, normalised, batched
    tensor) for a list of (3, H, W) images; the images themselves otherwise."""
    model = unwrap_model(model)
    if is_detector(model) and isinstance(images, (list, tuple)):
        image_list, _ = model.transform(images)
        return image_list.tensors
    return images


def check_scope(scope) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'backbone' or 'detector', got {scope!r}")


def scope_extra_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name prefix ending in '.', module)`` of the detector parts ``scope="detector"`` adds to the body: the
    FPN and the RPN head's shared conv (those present)."""
    model = unwrap_model(model)
    out = []
    fpn = getattr(model.backbone, "fpn", None)
    if fpn is not None:
        out.append((FPN + ".", fpn))
    rpn_head = getattr(getattr(model, "rpn", None), "head", None)
    if rpn_head is not None and hasattr(rpn_head, "conv"):
        out.append((RPN_HEAD_CONV + ".", rpn_head.conv))
    return out


def scope_prefixes(model: nn.Module, decomposed_names) -> list[str]:
    """Module-name prefixes whose FLOPs a ``flops_target`` refers to.

    Classifier: the whole model (``""``). Detector: the ResNet body; plus the FPN and the RPN when any of
    ``decomposed_names`` (the compressed layers) lies there (``scope: detector``).
    """
    if not is_detector(model):
        return [""]
    names = list(decomposed_names)
    prefixes = [BODY]
    if any(n.startswith(FPN + ".") for n in names):
        prefixes.append(FPN)
    if any(n.startswith(RPN + ".") for n in names):
        prefixes.append(RPN)
    return prefixes


def scope_of(model: nn.Module, decomposed_names) -> str:
    """The scope a model was compressed with, told from its compressed layers' names: ``"detector"`` when any
    lies in the FPN or the RPN, else ``"backbone"``."""
    return "detector" if len(scope_prefixes(model, decomposed_names)) > 1 else "backbone"


def under(name: str, prefix: str) -> bool:
    """Module ``name`` is ``prefix`` or inside it (``""`` covers everything; a prefix may end in ``.``)."""
    return not prefix or name == prefix or name.startswith(prefix + ".") or (prefix.endswith(".") and
                                                                           name.startswith(prefix))


def in_scope(name: str, prefixes) -> bool:
    """Module ``name`` lies under one of ``prefixes`` (see :func:`scope_prefixes`)."""
    return any(under(name, p) for p in prefixes)


def short_body_name(name: str) -> str:
    """``name`` relative to the detector's ResNet body (unchanged for other names)."""
    return name.replace(BODY_PREFIX, "")
