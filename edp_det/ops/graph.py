"""Channel graph of supported networks: which convolutions exist, which normalisation follows each, whose output
channels are free to prune, and which convolutions consume them.

Everything is addressed by qualified module name (``"layer1.0.conv2"``, in a detector prefixed with its body's
name), never by position. Where the parts live in a detector: :mod:`edp_det.ops.adapter`.

Supported:
  * torchvision ``ResNet`` classifiers (BasicBlock and Bottleneck; ResNet-18/34/50/101/152),
  * torchvision ``FasterRCNN`` whose backbone body is an ``IntermediateLayerGetter`` over a ResNet
    (``fasterrcnn_resnet50_fpn``, ``_v2`` and ``resnet_fpn_backbone`` bodies of any depth),
  * with ``scope="detector"`` also the FPN (inner 1×1 and layer 3×3 convs) and the RPN head conv, in low-rank mode
    (their output channels are shared across pyramid levels / by the top-down additions).

Channel-prunable (row groups, λ2): Bottleneck conv1/conv2 and BasicBlock conv1 (consumed by the next conv of the
block only), and the stem conv1 when the first residual block has a downsample branch (its consumers are then
``layer1.0.conv1`` and ``layer1.0.downsample.0``). Everything feeding a residual addition is low-rank only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from edp_det.ops.adapter import check_scope, find_resnet_body, scope_extra_modules, unwrap_model

__all__ = ["ConvNode", "ChannelGraph", "build_channel_graph", "get_submodule", "set_submodule", "unwrap_model",
           "find_resnet_body"]


@dataclass
class ConvNode:
    """One convolution of the graph.

    name: qualified name of the conv (an ``nn.Conv2d`` or, after ``decompose``, a ``CompressedAwareConv2d``).
    norm: qualified name of the normalisation applied to its output (None if none).
    prunable: output channels may be removed (not tied to a residual add or shared output).
    consumers: convs reading this conv's output channels (only meaningful when prunable).
    producer: the prunable conv whose output channels are this conv's input channels (None if the input is tied).
    """

    name: str
    norm: str | None
    prunable: bool
    consumers: list[str] = field(default_factory=list)
    producer: str | None = None


@dataclass
class ChannelGraph:
    root_prefix: str            # "" for classifiers, adapter.BODY_PREFIX for detectors
    nodes: dict[str, ConvNode]  # in forward order
    scope: str

    def __iter__(self):
        return iter(self.nodes.values())


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"model has no submodule named {name!r}") from e


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (its parent must exist)."""
    parent_name, _, attr = name.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    if not hasattr(parent, attr):
        raise ValueError(f"model has no submodule named {name!r}")
    setattr(parent, attr, module)


def _resnet_nodes(body: nn.Module, prefix: str) -> list[ConvNode]:
    nodes: list[ConvNode] = []
    layer1_first = body.layer1[0]
    stem_free = getattr(layer1_first, "downsample", None) is not None
    # A detector body that returns the stem output would tie it; IntermediateLayerGetter keeps return_layers.
    return_layers = getattr(body, "return_layers", {}) or {}
    if any(k in return_layers for k in ("conv1", "bn1", "relu", "maxpool")):
        stem_free = False
    stem = ConvNode(prefix + "conv1", prefix + "bn1", stem_free)
    nodes.append(stem)
    for li in range(1, 5):
        layer = getattr(body, f"layer{li}", None)
        if layer is None:
            continue
        for bi, block in enumerate(layer):
            p = f"{prefix}layer{li}.{bi}."
            if isinstance(block, Bottleneck):
                c1 = ConvNode(p + "conv1", p + "bn1", True, [p + "conv2"])
                c2 = ConvNode(p + "conv2", p + "bn2", True, [p + "conv3"], producer=c1.name)
                c3 = ConvNode(p + "conv3", p + "bn3", False, producer=c2.name)
                convs = [c1, c2, c3]
            elif isinstance(block, BasicBlock):
                c1 = ConvNode(p + "conv1", p + "bn1", True, [p + "conv2"])
                c2 = ConvNode(p + "conv2", p + "bn2", False, producer=c1.name)
                convs = [c1, c2]
            else:
                raise TypeError(f"unsupported residual block {type(block).__name__} at {p[:-1]!r}")
            if li == 1 and bi == 0 and stem_free:
                c1.producer = stem.name
                stem.consumers.append(c1.name)
            nodes.extend(convs)
            if block.downsample is not None:
                ds = ConvNode(p + "downsample.0", p + "downsample.1", False)
                if li == 1 and bi == 0 and stem_free:
                    ds.producer = stem.name
                    stem.consumers.append(ds.name)
                nodes.append(ds)
    return nodes


def _conv_names(module: nn.Module, prefix: str) -> list[str]:
    from edp_det.ops.block import CompressedAwareConv2d

    names = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, CompressedAwareConv2d)) and not _inside_block(module, name):
            names.append(prefix + name)
    return names


def _inside_block(root: nn.Module, name: str) -> bool:
    from edp_det.ops.block import CompressedAwareConv2d

    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(root.get_submodule(".".join(parts[:i])), CompressedAwareConv2d):
            return True
    return False


def _detector_extra_nodes(model: nn.Module) -> list[ConvNode]:
    """FPN and RPN-head convs of a torchvision detector, low-rank only (outputs shared)."""
    return [ConvNode(name, None, False) for prefix, module in scope_extra_modules(model)
            for name in _conv_names(module, prefix)]


def build_channel_graph(model: nn.Module, scope: str = "backbone") -> ChannelGraph:
    """Describe the convs EDP works on in ``model``.

    ``scope="backbone"``: the ResNet (classifier) or the detector's ResNet body.
    ``scope="detector"``: additionally the detector's FPN and RPN head convs (low-rank only).
    Norm names refer to modules that exist (a norm folded away by ``decompose`` is an ``nn.Identity``).
    """
    check_scope(scope)
    model = unwrap_model(model)
    prefix, body = find_resnet_body(model)
    nodes = _resnet_nodes(body, prefix)
    if scope == "detector":
        if not prefix:
            raise ValueError("scope='detector' needs a detector model; got a classifier")
        nodes.extend(_detector_extra_nodes(model))
    for n in nodes:
        if n.norm is not None:
            try:
                model.get_submodule(n.norm)
            except AttributeError:
                n.norm = None
    return ChannelGraph(prefix, {n.name: n for n in nodes}, scope)
