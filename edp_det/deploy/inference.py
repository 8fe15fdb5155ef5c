"""A faster inference form of a (compressed) model: BatchNorm folding, measured merge-vs-split of the low-rank
pairs PM left, measured memory format.

    fast = optimize_for_inference(pm_model, torch.randn(1, 3, 224, 224))
    fast, report = optimize_for_inference(pm_model, x, return_report=True); print(report.format())

What it does (on a copy unless ``inplace=True``; the result is in eval mode with ``requires_grad=False``):
  (a) ``fold_bn``: every ``BatchNorm2d`` (eval statistics) / ``FrozenBatchNorm2d`` that directly consumes the output
      of a convolution is folded into it — ``W ← W·s``, ``b ← b·s + t`` with ``s = γ/√(σ²+ε)``, ``t = β − μ·s``
      (float64, then cast) — and replaced by ``nn.Identity``. For PM's ``LowRankConv2d(basis, coeff)`` low-rank pairs
      (and CompressedAwareConv2d blocks) the fold goes into ``coeff``. Pairs are found by running the model once
      on ``example_input`` with hooks: a norm is folded only if *every* call of it reads the output of the
      convolution called just before it, and every call of that convolution is read by it. Exact up to rounding;
      the outputs are compared with the unfolded model (``ValueError`` if they disagree), which also guards the
      one thing hooks cannot see (a conv output also read by a functional op — torchvision models have none).
  (b) ``measure_merge``: for each remaining low-rank pair, the merged convolution (``W = β·θ'``, float64 product)
      and the pair are timed *at the input that layer actually sees* for ``example_input``; the faster is kept
      (merging needs to be at least ``merge_margin`` faster, since it costs more FLOPs — PM left the pair because
      eq. (14) says the merged conv is larger). FLOPs alone mis-rank these on CPUs: per-op overhead and the extra
      intermediate tensor of the pair are not FLOPs.
  (c) ``channels_last``: ``"auto"`` times the whole model in ``contiguous_format`` and ``channels_last`` (the
      input as given) and keeps the faster; ``True``/``False`` force it.

All decisions are specific to the input shape, dtype, device and thread count used here: optimise with an input
like the ones you will serve. Timing runs alternate the candidates (rounds × iterations, median) so that load from
other processes hits both. Nothing here changes the function beyond float rounding.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.deploy.timing import time_alternating
from edp_det.ops.block import CompressedAwareConv2d
from edp_det.ops.graph import set_submodule, unwrap_model
from edp_det.ops.surgery import LowRankConv2d, is_lowrank_pair, merged_conv

logger = logging.getLogger(__name__)

__all__ = ["optimize_for_inference", "fold_batchnorms", "InferenceReport"]

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


@dataclass
class InferenceReport:
    folded: list[tuple[str, str]] = field(default_factory=list)     # (conv name, norm name)
    memory_format: str = "contiguous"
    format_ms: dict[str, float] = field(default_factory=dict)        # memory format -> median ms per call
    merged: list[str] = field(default_factory=list)                  # pairs merged by measurement
    kept_split: list[str] = field(default_factory=list)
    layer_ms: dict[str, tuple[float, float]] = field(default_factory=dict)   # pair -> (split ms, merged ms)
    max_rel_err: float = 0.0                                         # final output vs the input model

    def format(self) -> str:
        lines = [f"folded {len(self.folded)} norm layers; memory format {self.memory_format} "
                 f"({', '.join(f'{k} {v:.2f} ms' for k, v in self.format_ms.items())}); "
                 f"merged {len(self.merged)} of {len(self.merged) + len(self.kept_split)} low-rank pairs by "
                 f"measurement; max rel. output error {self.max_rel_err:.2e}"]
        for name, (t_split, t_merged) in self.layer_ms.items():
            lines.append(f"  {name:<44} split {t_split:8.3f} ms  merged {t_merged:8.3f} ms  -> "
                         f"{'merged' if name in self.merged else 'split'}")
        return "\n".join(lines)


def _conv_like(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every Conv2d, low-rank pair and CompressedAwareConv2d (not the convs inside them)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if is_lowrank_pair(m) or isinstance(m, CompressedAwareConv2d):
            out[name] = m
            inside.append(name + ".")
        elif isinstance(m, nn.Conv2d):
            out[name] = m
    return out


def _call(model: nn.Module, example_input):
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _flatten_out(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_out(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_out(v)]
    return []


def _rel_err(a, b) -> float:
    fa, fb = _flatten_out(a), _flatten_out(b)
    if len(fa) != len(fb):
        return float("inf")
    err = 0.0
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point() or x.numel() == 0:
            continue
        x64, y64 = x.detach().double(), y.detach().double()
        err = max(err, float((x64 - y64).abs().max() / x64.abs().max().clamp_min(1e-30)))
    return err


def _find_conv_norm_pairs(model: nn.Module, example_input) -> list[tuple[str, str]]:
    convs = _conv_like(model)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, _NORMS)}
    last = {"out": None, "name": None}
    conv_calls: dict[str, int] = {}
    norm_src: dict[str, list] = {n: [] for n in norms}
    hooks = []

    def conv_hook(name):
        def hook(mod, inp, out):
            conv_calls[name] = conv_calls.get(name, 0) + 1
            last["out"], last["name"] = out, name
        return hook

    def norm_hook(name):
        def hook(mod, inp):
            src = last["name"] if inp and inp[0] is last["out"] else None
            norm_src[name].append(src)
        return hook

    try:
        for n, m in convs.items():
            hooks.append(m.register_forward_hook(conv_hook(n)))
        for n, m in norms.items():
            hooks.append(m.register_forward_pre_hook(norm_hook(n)))
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for h in hooks:
            h.remove()
        last["out"] = None
    pairs, used = [], set()
    for n, srcs in norm_src.items():
        if not srcs or any(s is None or s != srcs[0] for s in srcs):
            continue
        conv = srcs[0]
        if conv in used or conv_calls.get(conv) != len(srcs):
            continue
        used.add(conv)
        pairs.append((conv, n))
    return pairs


def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 of an eval-mode BatchNorm2d / FrozenBatchNorm2d."""
    if isinstance(norm, nn.BatchNorm2d):
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
        var, mean = norm.running_var.double(), norm.running_mean.double()
        w = norm.weight.double() if norm.affine else torch.ones_like(var)
        b = norm.bias.double() if norm.affine else torch.zeros_like(var)
    else:
        var, mean = norm.running_var.double(), norm.running_mean.double()
        w, b = norm.weight.double(), norm.bias.double()
    scale = w / torch.sqrt(var + norm.eps)
    return scale, b - mean * scale


def _fold_into_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    w = conv.weight
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode)
    new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype))
        b = shift if conv.bias is None else conv.bias.double() * scale + shift
        new.bias.copy_(b.to(w.dtype))
    return new.requires_grad_(False)


@torch.no_grad()
def fold_batchnorms(model: nn.Module, example_input) -> list[tuple[str, str]]:
    """Fold, in place, every norm layer that directly follows a convolution (see module docstring, (a)).
    ``model`` must be in eval mode. Returns the ``(conv, norm)`` name pairs folded."""
    root = unwrap_model(model)
    if root.training:
        raise ValueError("fold_batchnorms needs an eval-mode model (call model.eval())")
    pairs = _find_conv_norm_pairs(root, example_input)
    for conv_name, norm_name in pairs:
        conv = root.get_submodule(conv_name)
        scale, shift = _norm_affine(root.get_submodule(norm_name))
        if is_lowrank_pair(conv) or isinstance(conv, CompressedAwareConv2d):
            conv.coeff = _fold_into_conv(conv.coeff, scale, shift)
            if isinstance(conv, CompressedAwareConv2d):
                conv.norm_name = None
        else:
            set_submodule(root, conv_name, _fold_into_conv(conv, scale, shift))
        set_submodule(root, norm_name, nn.Identity())
    return pairs


def _merged_conv(pair: LowRankConv2d, channels_last: bool) -> nn.Conv2d:
    new = merged_conv(pair.basis.weight, pair.coeff.weight, pair.coeff.bias, pair.basis)
    if channels_last:
        new.to(memory_format=torch.channels_last)
    return new.requires_grad_(False)


@torch.no_grad()
def _measure_merges(root: nn.Module, example_input, report: InferenceReport, rounds: int, iters: int,
                    margin: float) -> None:
    pairs = {n: m for n, m in _conv_like(root).items() if is_lowrank_pair(m)}
    decisions: dict[str, nn.Conv2d] = {}
    hooks = []

    def pre_hook(name):
        def hook(mod, inp):
            if name in report.layer_ms:
                return
            x = inp[0]
            merged = _merged_conv(mod, report.memory_format == "channels_last")
            timed = time_alternating({"split": lambda: mod.coeff(mod.basis(x)), "merged": lambda: merged(x)},
                                     rounds=rounds, iters=iters, per_call=False, device=x.device)
            t_split, t_merged = timed.median("split"), timed.median("merged")
            report.layer_ms[name] = (1e3 * t_split, 1e3 * t_merged)
            if t_merged < (1 - margin) * t_split:
                decisions[name] = merged
        return hook

    try:
        for n, m in pairs.items():
            hooks.append(m.register_forward_pre_hook(pre_hook(n)))
        _call(root, example_input)
    finally:
        for h in hooks:
            h.remove()
    for name in pairs:
        if name in decisions:
            set_submodule(root, name, decisions[name])
            report.merged.append(name)
        elif name in report.layer_ms:
            report.kept_split.append(name)


@torch.no_grad()
def optimize_for_inference(model: nn.Module, example_input, *, fold_bn: bool = True, channels_last="auto",
                           measure_merge: bool = True, inplace: bool = False, rounds: int = 5, iters: int = 3,
                           merge_margin: float = 0.03, check: bool = True, return_report: bool = False):
    """Return a faster, numerically equivalent eval-mode version of ``model`` for inputs like ``example_input``.

    Args:
        model: any module; the steps apply to ResNet-like conv/norm models, PM output (``LowRankConv2d``
            pairs) and decomposed models. DDP wrappers are stripped.
        example_input: a tensor (or tuple of positional args) of the shape, dtype and device you will serve.
        fold_bn: (a) fold norm layers into the preceding convolutions.
        channels_last: (c) ``"auto"`` (measure), ``True`` or ``False``.
        measure_merge: (b) merge a low-rank pair where that is measured to be faster.
        inplace: modify ``model`` itself instead of a deep copy.
        rounds, iters: timing effort per decision (alternating rounds of ``iters`` calls, median).
        merge_margin: merging must be at least this fraction faster than the pair.
        check: compare the final outputs with the input model's (``ValueError`` beyond float rounding).
        return_report: also return an :class:`InferenceReport`.
    """
    if channels_last not in ("auto", True, False):
        raise ValueError(f"channels_last must be 'auto', True or False, got {channels_last!r}")
    src = unwrap_model(model)
    was_training = src.training
    src.eval()
    try:
        reference = _call(src, example_input) if check else None
    finally:
        src.train(was_training)
    root = src if inplace else copy.deepcopy(src)
    root.eval()
    report = InferenceReport()
    ref = next(iter(root.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    if fold_bn:
        report.folded = fold_batchnorms(root, example_input)
        if check:
            err = _rel_err(reference, _call(root, example_input))
            if err > tol:
                raise ValueError(f"folding norm layers changed the outputs (max rel. error {err:.3e}); a folded "
                                 f"convolution's output is probably also read outside its norm layer")
    formats = {"auto": ["contiguous", "channels_last"], True: ["channels_last"], False: ["contiguous"]}[channels_last]
    if len(formats) > 1:
        cl = copy.deepcopy(root).to(memory_format=torch.channels_last)
        timed = time_alternating({"contiguous": lambda: _call(root, example_input),
                                  "channels_last": lambda: _call(cl, example_input)}, rounds=rounds, iters=iters,
                                 per_call=False, device=ref.device if ref is not None else None)
        t_cont, t_cl = timed.median("contiguous"), timed.median("channels_last")
        report.format_ms = {"contiguous": 1e3 * t_cont, "channels_last": 1e3 * t_cl}
        del cl
        if t_cl < t_cont:
            root.to(memory_format=torch.channels_last)
            report.memory_format = "channels_last"
    elif formats[0] == "channels_last":
        root.to(memory_format=torch.channels_last)
        report.memory_format = "channels_last"
    if measure_merge:
        _measure_merges(root, example_input, report, rounds, iters, merge_margin)
    if check:
        report.max_rel_err = _rel_err(reference, _call(root, example_input))
        if report.max_rel_err > tol:
            raise ValueError(f"optimised model disagrees with the input model (max rel. error "
                             f"{report.max_rel_err:.3e})")
    root.requires_grad_(False)
    logger.info("optimize_for_inference: %s", report.format().splitlines()[0])
    return (root, report) if return_report else root
