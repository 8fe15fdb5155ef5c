"""Measured time per FLOP of every decomposed layer, for the latency-aware FLOPs budget.

FLOPs do not convert to time at the same rate in every layer: on a CPU at batch 1 the 7×7- and 14×14-position convs
of ResNet-50's layer3/4 are weight-bandwidth-bound and run at about half the FLOP rate of layer1/2, and at larger
batches the rate varies with the channel counts (docs/BENCHMARKS.md, section 3). A budget that removes the
weakest groups by norm alone therefore reaches a FLOPs target with less speed-up than the FLOPs promise. Dividing
every group's score by its layer's relative time per FLOP (``prune_and_merge(..., layer_weights=...)``) removes
groups from slow-per-FLOP layers first, so that the achieved FLOPs cut buys more time.

    weights = measure_time_per_flop(model, torch.randn(1, 3, 224, 224))   # {block name: relative s/FLOP}
    report = prune_and_merge(model, flops_target=0.6, input_size=(3, 224, 224), layer_weights=weights)

How a layer is timed: a dense ``nn.Conv2d`` of the block's *original* shape (c_in × c_out × k × k, same stride,
padding, dilation; random weights — time does not depend on the values) is run on the input that block actually
sees for ``example_input`` (captured by a forward pre-hook, so for a detector the real feature-map sizes), in the
requested memory format, ``rounds`` × ``iters`` calls after one warm-up; its time per FLOP divided by the
FLOPs-weighted mean of all layers (Σ time / Σ FLOPs) is the layer's weight, so a weight of 1 is an average layer.
The shape is the original one, not the live structure: the weights describe where time goes in the dense network
and do not depend on how training has sparsified it. Measure on the device, dtype, batch size and thread count you
will serve with.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .block import CompressedAwareConv2d
from .decompose import iter_blocks
from .graph import unwrap_model
from .inference import _time_alternating

logger = logging.getLogger(__name__)

__all__ = ["measure_time_per_flop", "check_layer_weights"]


def _dense_like(block: CompressedAwareConv2d, like: torch.Tensor, channels_last: bool) -> nn.Conv2d:
    """A random dense conv with the block's original shape (c_in × c_out × k × k), on ``like``'s device/dtype."""
    b = block.basis
    conv = nn.Conv2d(block.in_channels, block.out_channels, b.kernel_size, stride=b.stride, padding=b.padding,
                     dilation=b.dilation, bias=True).to(device=like.device, dtype=like.dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    return conv.requires_grad_(False)


@torch.no_grad()
def measure_time_per_flop(model: nn.Module, example_input: torch.Tensor | None = None, *, input_size=(3, 224, 224),
                          batch_size: int = 1, channels_last: bool = True, rounds: int = 3,
                          iters: int = 2) -> dict[str, float]:
    """Relative time per FLOP of every :class:`CompressedAwareConv2d` of a decomposed ``model``.

    Args:
        model: a decomposed classifier, or a decomposed torchvision detector (then ``backbone.body`` is run on
            ``example_input``; blocks outside it, e.g. FPN/RPN with ``scope="detector"``, get no entry).
        example_input: ``(N, C, H, W)`` images in the model's dtype/device (detector: the size after its
            transform, e.g. ``(1, 3, 800, 800)``); default ``zeros(batch_size, *input_size)``.
        channels_last: time the dense convs in ``channels_last`` (what
            :func:`edp_det.inference.optimize_for_inference` picks on CPUs) rather than contiguous format.
        rounds, iters: timing effort per layer (after one warm-up call: median over rounds of the mean of
            ``iters`` calls; the timer of :func:`edp_det.inference.optimize_for_inference`).
    Returns:
        ``{block name: weight}``, weight = (time / FLOPs of the layer) / (Σ time / Σ FLOPs over all layers).
    """
    root = unwrap_model(model)
    blocks = dict(iter_blocks(root))
    if not blocks:
        raise ValueError("model was never decomposed (no CompressedAwareConv2d): call edp_det.decompose first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got rounds={rounds!r}, iters={iters!r}")
    ref = next(iter(root.parameters()))
    runner = root.backbone.body if hasattr(root, "backbone") and hasattr(root.backbone, "body") else root
    if example_input is None:
        example_input = torch.zeros((batch_size, *input_size), dtype=ref.dtype, device=ref.device)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError(f"example_input must be an (N, C, H, W) tensor, got "
                         f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    timed: dict[str, tuple[float, int]] = {}

    def pre_hook(name: str, block: CompressedAwareConv2d):
        def hook(mod, inp):
            if name in timed:
                return
            x = inp[0].contiguous(memory_format=torch.channels_last) if channels_last else inp[0].contiguous()
            conv = _dense_like(block, x, channels_last)
            out = conv(x)
            flops = 2 * out.numel() * block.in_channels * math.prod(conv.kernel_size)
            timed[name] = (_time_alternating([lambda: conv(x)], rounds, iters, x.device)[0], flops)
        return hook

    was_training = runner.training
    hooks = [b.register_forward_pre_hook(pre_hook(n, b)) for n, b in blocks.items()]
    try:
        runner.eval()
        runner(example_input)
    finally:
        for h in hooks:
            h.remove()
        runner.train(was_training)
    if not timed:
        raise ValueError("no decomposed layer ran on example_input (is it the right model part and size?)")
    mean = sum(t for t, _ in timed.values()) / sum(f for _, f in timed.values())
    weights = {n: (t / f) / mean for n, (t, f) in timed.items()}
    logger.info("time per FLOP measured for %d layers: weights %.2f .. %.2f", len(weights), min(weights.values()),
                max(weights.values()))
    return weights


def check_layer_weights(layer_weights, known_names) -> dict[str, float]:
    """Validate ``{layer name: positive finite weight}``; names must be decomposed layers (``ValueError``)."""
    if not isinstance(layer_weights, dict):
        raise TypeError(f"layer_weights must be a dict of layer name -> weight, got {type(layer_weights).__name__}")
    known = set(known_names)
    unknown = sorted(set(layer_weights) - known)
    if unknown:
        raise ValueError(f"layer_weights names layers that are not decomposed blocks: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    out = {}
    for name, w in layer_weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"layer_weights[{name!r}] must be a positive finite number, got {w!r}")
        out[name] = float(w)
    return out
