"""Module surgery shared by Pruning & Merging, compaction, the latency variants, the inference form and the
optimizer-state transfer: slicing convolutions and norm layers to kept channels, slicing per-parameter optimizer
state the same way, merging a low-rank pair θ' (basis) then β (coeff) into one convolution, and the named module
that holds an unmerged pair (:class:`LowRankConv2d`).

All functions build new modules on the device and in the dtype of the module they replace and never change the
function beyond float rounding: a merged weight is the float64 product ``β·θ'`` cast back to the layer's dtype;
sliced weights are copies of the kept entries.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LowRankConv2d", "is_lowrank_pair", "kept_indices", "select", "conv_like", "slice_conv", "slice_norm",
           "merged_weight", "merged_conv", "slice_param_state", "remap_optimizer"]


class LowRankConv2d(nn.Module):
    """A low-rank convolution as two convs: ``basis`` θ' (k×k, ``c_in → rank``, the layer's stride, padding and
    dilation, no bias) then ``coeff`` β (1×1, ``rank → c_out``, the layer's bias). What PM leaves where merging
    does not pay; its state-dict keys are ``basis.weight``, ``coeff.weight`` and ``coeff.bias``."""

    def __init__(self, basis: nn.Conv2d, coeff: nn.Conv2d):
        super().__init__()
        self.basis = basis
        self.coeff = coeff

    @property
    def in_channels(self) -> int:
        return self.basis.in_channels

    @property
    def rank(self) -> int:
        return self.basis.out_channels

    @property
    def out_channels(self) -> int:
        return self.coeff.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coeff(self.basis(x))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}"


def is_lowrank_pair(m: nn.Module) -> bool:
    return isinstance(m, LowRankConv2d)


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of live entries; a fully dead dimension keeps its first entry (all-zero, so still exact), because
    torch convolutions cannot have zero output channels."""
    idx = torch.nonzero(mask).flatten()
    return idx if idx.numel() else torch.zeros(1, dtype=torch.long, device=mask.device)


def select(w: torch.Tensor, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``w`` restricted to ``out_idx`` along dim 0 and ``in_idx`` along dim 1 (None: all)."""
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    return w


def conv_like(ref: torch.Tensor, c_in: int, c_out: int, kernel, stride, padding, dilation, bias: bool) -> nn.Conv2d:
    """A fresh ``nn.Conv2d`` on ``ref``'s device and dtype (weights to be overwritten)."""
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).to(
        device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None,
               requires_grad: bool | None = None) -> nn.Conv2d:
    """A copy of ``conv`` (groups=1) holding only output channels ``out_idx`` and input channels ``in_idx``
    (None: all). ``requires_grad``: of the new parameters (default: as ``conv.weight``)."""
    if conv.groups != 1:
        raise TypeError("slice_conv supports groups=1 convolutions only")
    w = select(conv.weight, out_idx, in_idx)
    new = conv_like(conv.weight, w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None)
    new.weight.copy_(w)
    if conv.bias is not None:
        new.bias.copy_(conv.bias if out_idx is None else conv.bias[out_idx])
    new.requires_grad_(conv.weight.requires_grad if requires_grad is None else requires_grad)
    return new


@torch.no_grad()
def slice_norm(norm: nn.Module, keep: torch.Tensor, name: str | None = None) -> nn.Module:
    """A BatchNorm2d holding only the channels in ``keep`` (a bool mask or an index tensor): affine parameters,
    running statistics, train/eval mode and ``requires_grad`` carried over. ``TypeError`` for other norm types
    (``name``, if given, is named in the message)."""
    if not isinstance(norm, nn.BatchNorm2d):
        where = f" {name!r}" if name else ""
        raise TypeError(f"cannot slice normalisation layer{where} of type {type(norm).__name__}")
    n = int(keep.sum()) if keep.dtype == torch.bool else len(keep)
    new = nn.BatchNorm2d(n, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)
    ref = norm.weight if norm.affine else norm.running_mean
    new.to(device=ref.device, dtype=ref.dtype)
    if norm.affine:
        new.weight.copy_(norm.weight[keep])
        new.bias.copy_(norm.bias[keep])
        new.weight.requires_grad_(norm.weight.requires_grad)
        new.bias.requires_grad_(norm.bias.requires_grad)
    if norm.track_running_stats:
        new.running_mean.copy_(norm.running_mean[keep])
        new.running_var.copy_(norm.running_var[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    new.train(norm.training)
    return new


def merged_weight(theta: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``β·θ'`` as one conv weight ``(c_out, c_in, kh, kw)``, computed in float64 and cast to θ''s dtype.
    ``theta``: ``(r, c_in, kh, kw)``; ``beta``: ``(c_out, r, 1, 1)``."""
    r, ci, kh, kw = theta.shape
    co = beta.shape[0]
    w = beta.reshape(co, r).double() @ theta.reshape(r, -1).double()
    return w.view(co, ci, kh, kw).to(theta.dtype)


@torch.no_grad()
def merged_conv(theta: torch.Tensor, beta: torch.Tensor, bias: torch.Tensor | None, geometry: nn.Conv2d,
                requires_grad: bool = True) -> nn.Conv2d:
    """One ``nn.Conv2d`` computing ``β·θ'`` (+ ``bias``) with the stride, padding and dilation of ``geometry``
    (the basis conv), on ``theta``'s device and dtype."""
    r, ci, kh, kw = theta.shape
    co = beta.shape[0]
    new = conv_like(theta, ci, co, (kh, kw), geometry.stride, geometry.padding, geometry.dilation, bias is not None)
    new.weight.copy_(merged_weight(theta, beta))
    if bias is not None:
        new.bias.copy_(bias)
    return new.requires_grad_(requires_grad)


def slice_param_state(state: dict, shape: torch.Size, idx) -> dict:
    """Per-parameter optimizer state (SGD ``momentum_buffer``, Adam ``exp_avg`` / ``exp_avg_sq``, ...) of a
    parameter of ``shape`` restricted to ``idx`` (one index tensor or None per leading dim; ``idx=None``: all).
    Tensors of another shape (e.g. Adam's ``step``) and non-tensors are copied as they are."""
    new_st = {}
    for key, v in state.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == shape:
            if idx is not None:
                for d, ix in enumerate(idx):
                    if ix is not None:
                        v = v.index_select(d, ix.to(v.device))
            new_st[key] = v.clone()
        else:
            new_st[key] = v.clone() if isinstance(v, torch.Tensor) else v
    return new_st


def remap_optimizer(optimizer: torch.optim.Optimizer, remap: dict) -> None:
    """Swap old parameters for new ones in ``optimizer`` (in place, so schedulers holding it keep working) and
    slice their per-parameter state. ``remap``: ``{id(old param): (new param, index per dim)}``."""
    for group in optimizer.param_groups:
        params = group["params"]
        for k, p in enumerate(params):
            hit = remap.get(id(p))
            if hit is None:
                continue
            new_p, idx = hit
            params[k] = new_p
            st = optimizer.state.pop(p, None)
            if not st:
                continue
            optimizer.state[new_p] = slice_param_state(st, p.shape, idx)
