"""Measured time per FLOP of every decomposed layer, for the latency-aware FLOPs budget.

FLOPs do not convert to time at the same rate in every layer: on a CPU at batch 1 the 7×7- and 14×14-position convs
of ResNet-50's layer3/4 are weight-bandwidth-bound, and everywhere a residual block keeps costs no FLOPs cut removes
(its residual-width output, the add and ReLU, one call per layer). A budget that removes the weakest groups by norm
alone therefore reaches a FLOPs target with less speed-up than the FLOPs promise. Dividing every group's score by
its layer's relative time per FLOP (``prune_and_merge(..., layer_weights=...)``) removes groups where a FLOP cut
buys the most time first. By default the budget estimates those weights from the layers' shapes
(:meth:`edp_det.edp.budget.Structure.estimated_time_per_flop`); this module measures them on the hardware instead.

    weights = measure_time_per_flop(model, torch.randn(1, 3, 224, 224))   # {block name: relative s/FLOP}
    report = prune_and_merge(model, flops_target=0.6, input_size=(3, 224, 224), layer_weights=weights)

Two latency models (``mode``):

* ``"marginal"`` (default): the time a FLOP cut actually removes. The network is built twice in its inference form
  (:func:`edp_det.deploy.inference.optimize_for_inference`'s norm folding and memory format): *dense* (every layer at its
  original shape) and *thin* (every layer's rank, and every channel-prunable layer's output channels, cut to the
  fraction ``thin``, consumers' inputs with them, merged by eq. (14) as PM would). Each **unit** — the residual
  block (torchvision ``BasicBlock``/``Bottleneck``) containing the layer, or the layer itself outside blocks — is
  timed in both forms on the input it really sees; the unit's slope ``(t_dense − t_thin) / (F_dense − F_thin)``
  is the weight of all its layers. What a block keeps however thin it gets (its residual-width tensors) does not
  count as removable time, which the average model below wrongly does: on ResNet-50 this moves the cut from layer1
  (large maps, little removable time) to layer3/4, closer to the FLOPs-ideal speed-up (figures in
  docs/BENCHMARKS.md, "Inference").
* ``"average"``: a dense ``nn.Conv2d`` of each layer's original shape alone, time / FLOPs.

Weights are normalised so that their FLOPs-weighted mean is 1 (``marginal``: Σ Δt / Σ ΔF over units;
``average``: Σ t / Σ F over layers); a unit whose measured slope is not positive (noise) gets ``MIN_WEIGHT``.
Shapes are the original ones, not the live structure: the weights describe the hardware and the dense network and
do not depend on how training has sparsified it. Measure on the device, dtype, batch size and thread count you
will serve with, on an otherwise idle machine: the norm ÷ weight ranking has many near-ties, so timing noise can
change the structure materially (docs/RESULTS.md, raccoon); ``compress.latency.weights`` reuses saved weights.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from edp_det.deploy.timing import time_alternating
from edp_det.ops.adapter import body_of
from edp_det.ops.block import CompressedAwareConv2d
from edp_det.edp.budget import check_layer_weights, structure_from_model
from edp_det.edp.decompose import iter_blocks
from edp_det.ops.flops import count_flops
from edp_det.ops.graph import unwrap_model
from edp_det.deploy.inference import optimize_for_inference
from edp_det.edp.pruning import PMReport, apply_structure

logger = logging.getLogger(__name__)

__all__ = ["measure_time_per_flop", "LatencyProfile", "check_layer_weights", "check_latency_mode", "LATENCY_MODES",
           "MIN_WEIGHT"]

LATENCY_MODES = ("marginal", "average")
MIN_WEIGHT = 0.05      # floor of a weight (a unit whose thin form measured no faster than its dense form)


def check_latency_mode(value) -> None:
    if value not in LATENCY_MODES:
        raise ValueError(f"latency mode must be one of {', '.join(LATENCY_MODES)}, got {value!r}")


def _dense_like(block: CompressedAwareConv2d, like: torch.Tensor, channels_last: bool) -> nn.Conv2d:
    """A random dense conv with the block's original shape (c_in × c_out × k × k), on ``like``'s device/dtype."""
    b = block.basis
    conv = nn.Conv2d(block.in_channels, block.out_channels, b.kernel_size, stride=b.stride, padding=b.padding,
                     dilation=b.dilation, bias=True).to(device=like.device, dtype=like.dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    return conv.requires_grad_(False)


@dataclass
class LatencyProfile:
    """What :func:`measure_time_per_flop` measured (``return_profile=True``).

    mode: ``"marginal"`` or ``"average"``.
    units: ``{unit name: (t_dense, t_thin, flops_dense, flops_thin)}`` — seconds per call and FLOPs (2 per
        multiply-add, whole batch) of each timed unit; ``average`` mode: one unit per layer and ``t_thin = 0``,
        ``flops_thin = 0``.
    unit_of: ``{layer name: unit name}``.
    weights: ``{layer name: weight}`` (what :func:`measure_time_per_flop` returns).
    """

    mode: str
    units: dict = field(default_factory=dict)
    unit_of: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"{'unit':<36} {'t dense ms':>10} {'t thin ms':>10} {'GFLOPs dense':>12} {'GFLOPs thin':>11} "
                 f"{'weight':>7}"]
        for u, (td, tt, fd, ft) in self.units.items():
            w = next((self.weights[n] for n, v in self.unit_of.items() if v == u and n in self.weights), float("nan"))
            lines.append(f"{u:<36} {1e3 * td:>10.3f} {1e3 * tt:>10.3f} {fd / 1e9:>12.3f} {ft / 1e9:>11.3f} {w:>7.2f}")
        return "\n".join(lines)


def _unit_of(root: nn.Module, name: str) -> str:
    """The residual block (torchvision BasicBlock / Bottleneck) containing layer ``name``, else ``name`` itself."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:k])
        if isinstance(root.get_submodule(anc), (BasicBlock, Bottleneck)):
            return anc
    return name


@torch.no_grad()
def _surgery_variant(root: nn.Module, thin: float | None) -> nn.Module:
    """An eval-mode copy of a decomposed ``root`` after PM's surgery with every group kept (``thin=None``: each
    layer one dense conv of its shape) or with the first ``ceil(thin · n)`` rank groups of every layer and
    output channels of every channel-prunable layer kept (consumers' inputs follow). Weights are irrelevant here
    (only times are measured), so masks are set directly instead of from zero groups."""
    m = copy.deepcopy(root).eval()
    struct = structure_from_model(m, need_positions=False)
    for l in struct.layers:
        b = l.block
        dev = b.coeff.weight.device
        l.row_live = torch.ones(b.out_channels, dtype=torch.bool, device=dev)
        l.col_live = torch.ones(b.rank, dtype=torch.bool, device=dev)
        if thin is not None:
            l.col_live[max(1, math.ceil(thin * b.rank)):] = False
            if l.prunable:
                l.row_live[max(1, math.ceil(thin * b.out_channels)):] = False
    apply_structure(m, struct, PMReport(), "eq14")
    return m


def _unit_inputs(root: nn.Module, units, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named unit receives (first call) when ``root``'s runner is called on ``x``."""
    seen: dict[str, torch.Tensor] = {}

    def pre_hook(name):
        def hook(mod, inp):
            seen.setdefault(name, inp[0])
        return hook

    hooks = [root.get_submodule(u).register_forward_pre_hook(pre_hook(u)) for u in units]
    try:
        body_of(root)(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _marginal_profile(root, blocks, x, channels_last: bool, thin: float, rounds: int, iters: int) -> LatencyProfile:
    prof = LatencyProfile("marginal", unit_of={n: _unit_of(root, n) for n in blocks})
    units = list(dict.fromkeys(prof.unit_of.values()))
    variants = []
    for frac in (None, thin):
        v = _surgery_variant(root, frac)
        optimize_for_inference(body_of(v), x, measure_merge=False, channels_last=channels_last, check=False,
                               inplace=True)
        variants.append(v)
    dense, thinned = variants
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    in_dense, in_thin = _unit_inputs(dense, units, xin), _unit_inputs(thinned, units, xin)
    for u in units:
        if u not in in_dense:        # outside the runner (e.g. FPN / RPN layers of a detector)
            continue
        ud, ut = dense.get_submodule(u), thinned.get_submodule(u)
        xd, xt = in_dense[u], in_thin[u]
        timed = time_alternating({"dense": lambda: ud(xd), "thin": lambda: ut(xt)}, rounds=rounds, iters=iters,
                                 per_call=False, device=x.device)
        td, tt = timed.median("dense"), timed.median("thin")
        fd = count_flops(ud, example_inputs=xd).flops
        ft = count_flops(ut, example_inputs=xt).flops
        prof.units[u] = (td, tt, fd, ft)
    cut = [(td - tt, fd - ft) for td, tt, fd, ft in prof.units.values() if fd > ft]
    if not cut:
        raise ValueError("no layer can be cut below its dense shape: nothing to measure")
    mean = sum(dt for dt, _ in cut) / sum(df for _, df in cut)
    for n, u in prof.unit_of.items():
        if u in prof.units:
            td, tt, fd, ft = prof.units[u]
            prof.weights[n] = max(MIN_WEIGHT, (td - tt) / (fd - ft) / mean) if fd > ft and mean > 0 else 1.0
    return prof


def _average_profile(root, blocks, x, channels_last: bool, rounds: int, iters: int) -> LatencyProfile:
    prof = LatencyProfile("average", unit_of={n: n for n in blocks})

    def pre_hook(name: str, block: CompressedAwareConv2d):
        def hook(mod, inp):
            if name in prof.units:
                return
            xi = inp[0].contiguous(memory_format=torch.channels_last) if channels_last else inp[0].contiguous()
            conv = _dense_like(block, xi, channels_last)
            out = conv(xi)
            flops = 2 * out.numel() * block.in_channels * math.prod(conv.kernel_size)
            t = time_alternating({name: lambda: conv(xi)}, rounds=rounds, iters=iters, per_call=False,
                                 device=xi.device).median(name)
            prof.units[name] = (t, 0.0, flops, 0)
        return hook

    hooks = [b.register_forward_pre_hook(pre_hook(n, b)) for n, b in blocks.items()]
    try:
        body_of(root)(x)
    finally:
        for h in hooks:
            h.remove()
    if not prof.units:
        raise ValueError("no decomposed layer ran on example_input (is it the right model part and size?)")
    mean = sum(t for t, _, _, _ in prof.units.values()) / sum(f for _, _, f, _ in prof.units.values())
    prof.weights = {n: (t / f) / mean for n, (t, _, f, _) in prof.units.items()}
    return prof


@torch.no_grad()
def measure_time_per_flop(model: nn.Module, example_input: torch.Tensor | None = None, *, input_size=(3, 224, 224),
                          batch_size: int = 1, mode: str = "marginal", thin: float = 0.05,
                          channels_last: bool = True, rounds: int = 3, iters: int = 2,
                          return_profile: bool = False):
    """Relative time per FLOP of every :class:`CompressedAwareConv2d` of a decomposed ``model``.

    Args:
        model: a decomposed classifier, or a decomposed torchvision detector (then its ResNet body is run on
            ``example_input``; blocks outside it, e.g. FPN/RPN with ``scope="detector"``, get no entry).
        example_input: ``(N, C, H, W)`` images in the model's dtype/device (detector: the size after its
            transform, e.g. ``(1, 3, 800, 800)``); default ``zeros(batch_size, *input_size)``.
        mode: ``"marginal"`` (time a FLOP cut removes, per residual block) or ``"average"`` (time per FLOP of
            each layer's dense conv); see the module docstring.
        thin: ``marginal`` only: the fraction of groups the thin variant keeps, in (0, 1).
        channels_last: time in ``channels_last`` (what :func:`edp_det.deploy.inference.optimize_for_inference` picks
            on CPUs) rather than contiguous format.
        rounds, iters: timing effort per unit (:func:`edp_det.deploy.timing.time_alternating` after one warm-up
            call: median over rounds of the mean of ``iters`` calls, as in
            :func:`edp_det.deploy.inference.optimize_for_inference`).
        return_profile: return a :class:`LatencyProfile` (times, FLOPs, units, weights) instead of the weights.
    Returns:
        ``{block name: weight}``, weights normalised to a FLOPs-weighted mean of 1 (module docstring).
    """
    root = unwrap_model(model)
    blocks = dict(iter_blocks(root))
    if not blocks:
        raise ValueError("model was never decomposed (no CompressedAwareConv2d): call edp_det.edp.decompose first")
    check_latency_mode(mode)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got rounds={rounds!r}, iters={iters!r}")
    if isinstance(thin, bool) or not isinstance(thin, (int, float)) or not 0 < thin < 1:
        raise ValueError(f"thin must be a fraction in (0, 1), got {thin!r}")
    ref = next(iter(root.parameters()))
    if example_input is None:
        example_input = torch.zeros((batch_size, *input_size), dtype=ref.dtype, device=ref.device)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError(f"example_input must be an (N, C, H, W) tensor, got "
                         f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    runner = body_of(root)
    was_training = runner.training
    try:
        runner.eval()
        if mode == "marginal":
            prof = _marginal_profile(root, blocks, example_input, channels_last, float(thin), rounds, iters)
        else:
            prof = _average_profile(root, blocks, example_input, channels_last, rounds, iters)
    finally:
        runner.train(was_training)
    w = prof.weights
    logger.info("time per FLOP (%s) measured for %d layers: weights %.2f .. %.2f", mode, len(w), min(w.values()),
                max(w.values()))
    return prof if return_profile else w
