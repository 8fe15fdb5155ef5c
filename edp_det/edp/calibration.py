"""Forward passes over a few training batches without training: re-estimating BatchNorm statistics after a
structural change, and feeding layer-fitting methods (ADMM-LRS) with real inputs.

Why BatchNorm needs it: a from-scratch detector normalises with running means/variances recorded *before* PM.
Pruning removes channels, ranks and (with a FLOPs target) non-zero groups, so the pre-activations that reach each
BatchNorm change; evaluating with the stale statistics can collapse accuracy (docs/RESULTS.md, built-in demo).
Re-estimating them on a few batches costs forward passes only and restores the match.
``FrozenBatchNorm2d`` (pretrained detectors) holds fixed statistics that belong to the affine transform and is
left alone.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edp_det.ops.adapter import body_input, body_of, is_detector
from edp_det.runtime.distributed import all_reduce_mean

logger = logging.getLogger(__name__)


def forward_batch(model: nn.Module, batch, device, *, body_only: bool = False) -> None:
    """Run one raw training batch through ``model`` (no targets, so a detector runs its inference path).

    ``batch`` is what the task's loader yields: ``(images, targets)`` with ``images`` a list of (3, H, W) float
    tensors (detection) or an (N, 3, H, W) tensor (classification), or the images alone. ``body_only=True`` runs a
    detector only through its transform and its ResNet body (enough when only body layers are observed).
    """
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(images, (list, tuple)):
        images = [im.to(device) for im in images]
        if body_only and is_detector(model):
            body_of(model)(body_input(model, images))
        else:
            model(images)
    else:
        model(images.to(device))


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Qualified names and modules of the BatchNorm layers that track running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, device=None, *,
                          forward: Callable[[nn.Module, object, torch.device], None] = forward_batch,
                          distributed: bool = False) -> int:
    """Re-estimate the running mean/variance of every BatchNorm layer of ``model`` on ``batches``.

    Statistics are reset and then accumulated as an exact cumulative average over the batches (``momentum=None``),
    with the BatchNorm layers in training mode and every other module in eval mode; no parameter changes and no
    gradient is computed. With ``distributed=True`` the estimates are averaged over all ranks (each rank sees its
    own batches) so every rank ends with the same buffers. The model's train/eval flags and the layers'
    momenta are restored. Returns the number of batches used (0 if the model has no such layer).

    Raises ``ValueError`` if the model has BatchNorm layers but ``batches`` is empty.
    """
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    if device is None:
        device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for _, bn in bns]
    n = 0
    try:
        model.eval()
        for _, bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in batches:
            forward(model, batch, device)
            n += 1
    finally:
        for (_, bn), mom in zip(bns, momenta):
            bn.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise ValueError("recalibrate_batchnorm: no batches given; the running statistics were reset and need "
                         "at least one batch")
    if distributed:
        for _, bn in bns:
            bn.running_mean.copy_(all_reduce_mean(bn.running_mean))
            bn.running_var.copy_(all_reduce_mean(bn.running_var))
    logger.info("recalibrated %d BatchNorm layers on %d batches", len(bns), n)
    return n
