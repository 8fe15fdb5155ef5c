"""``decompose``: replace every convolution EDP works on by a function-preserving CompressedAwareConv2d."""
from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.block import FORWARD_MODES, CompressedAwareConv2d
from edp_det.ops.graph import build_channel_graph, get_submodule, set_submodule, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["decompose", "iter_blocks", "is_decomposed", "fold_frozen_bn_into_block"]


def iter_blocks(model: nn.Module):
    """Yield ``(qualified_name, block)`` for every CompressedAwareConv2d in ``model`` (forward order)."""
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, CompressedAwareConv2d):
            yield name, m


def is_decomposed(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`~edp_det.ops.block.CompressedAwareConv2d` (i.e. :func:`decompose` ran
    and PM has not replaced every block yet)."""
    return any(True for _ in iter_blocks(model))


def fold_frozen_bn_into_block(block: CompressedAwareConv2d, bn: FrozenBatchNorm2d) -> None:
    """Fold a FrozenBatchNorm2d (a fixed per-channel affine map) into β and the bias of ``block``.

    ``y = x·s + t`` with ``s = w / sqrt(rv + eps)`` and ``t = b − rm·s``; afterwards the BN is an Identity, and
    the row group of channel i (β row i + bias i) fully determines the channel, so a zero group outputs zero.
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    coeff = block.coeff
    requires_grad = coeff.weight.requires_grad
    new = nn.Conv2d(coeff.in_channels, coeff.out_channels, 1, bias=True).to(coeff.weight.device, coeff.weight.dtype)
    with torch.no_grad():
        w64 = coeff.weight.double() * scale.double().view(-1, 1, 1, 1)
        b64 = shift.double()
        if coeff.bias is not None:
            b64 = b64 + coeff.bias.double() * scale.double()
        new.weight.copy_(w64.to(new.weight.dtype))
        new.bias.copy_(b64.to(new.bias.dtype))
    new.weight.requires_grad_(requires_grad)
    new.bias.requires_grad_(requires_grad)
    block.coeff = new


def decompose(model: nn.Module, *, channel_prune="auto", init: str = "svd", scope: str = "backbone",
              forward_mode: str = "auto", fold_frozen_bn: bool = True) -> nn.Module:
    """Decompose, in place, every conv of a supported model into a compressed-aware block; returns ``model``.

    Args:
        model: a torchvision ResNet classifier, or a torchvision Faster R-CNN (its ResNet body is found
            automatically). May be wrapped in DDP.
        channel_prune: ``"auto"``/``True`` — row pruning (λ2) on convs whose output channels are free (see
            :mod:`edp_det.ops.graph`); ``False``/``"none"`` — low-rank only everywhere.
        init: ``"svd"`` (rank-revealing, β columns ordered by singular value) or ``"identity"`` (θ'=θ, β=I where
            ``c_out ≤ c_in·k·k``, SVD elsewhere).
        scope: ``"backbone"`` or, for detectors, ``"detector"`` (also FPN and RPN head convs, low-rank only).
        forward_mode: see :class:`CompressedAwareConv2d`.
        fold_frozen_bn: fold a FrozenBatchNorm2d that follows a decomposed conv into β and a bias (the BN becomes
            ``nn.Identity``), so that channel groups own the whole per-channel affine map. Exact up to rounding.

    After ``decompose`` the model computes the same function (eval mode; float rounding only).
    """
    if channel_prune not in ("auto", True, False, "none"):
        raise ValueError(f"channel_prune must be 'auto', True, False or 'none', got {channel_prune!r}")
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
    root = unwrap_model(model)
    if is_decomposed(root):
        raise ValueError("model is already decomposed (it contains CompressedAwareConv2d blocks)")
    graph = build_channel_graph(root, scope=scope)
    allow_rows = channel_prune in ("auto", True)
    for node in graph:
        conv = get_submodule(root, node.name)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{node.name!r} is a {type(conv).__name__}, expected nn.Conv2d")
        prunable = allow_rows and node.prunable
        block = CompressedAwareConv2d.from_conv(conv, init=init, channel_prunable=prunable)
        block.forward_mode = forward_mode
        norm = get_submodule(root, node.norm) if node.norm else None
        if isinstance(norm, FrozenBatchNorm2d) and fold_frozen_bn:
            fold_frozen_bn_into_block(block, norm)
            set_submodule(root, node.norm, nn.Identity())
            norm = None
        if prunable and norm is not None:
            if not isinstance(norm, nn.BatchNorm2d) or not norm.affine:
                raise TypeError(f"channel pruning of {node.name!r} needs an affine BatchNorm2d or a "
                                f"FrozenBatchNorm2d after it, found {type(norm).__name__}")
            block.norm_name = node.norm
        set_submodule(root, node.name, block)
    logger.info("decomposed %d convolutions (%d channel-prunable)", len(graph.nodes),
                sum(b.channel_prunable for _, b in iter_blocks(root)))
    return model
