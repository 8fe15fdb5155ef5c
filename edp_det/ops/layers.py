"""Small module types the comparison methods leave in a model (all serialisable, see :mod:`edp_det.deploy.serialization`).

* :class:`MaskedConv2d` — an ``nn.Conv2d`` whose weight is multiplied by a fixed binary ``mask`` buffer (the
  masked sparse convolution of Guo et al. 2019). Counted FLOPs: only the unmasked weights (2 per multiply-add).
* :class:`LowRankSparseConv2d` — ``W = β·θ' + S ⊙ mask``: a low-rank product (``basis`` θ' k×k conv to ``r``
  channels, ``coeff`` β 1×1 conv) plus a masked sparse conv ``sparse`` (LRS, ADMM-LRS). It *executes* densely as
  one convolution with the effective kernel (the cheapest dense realisation); FLOPs are *counted* as a sparse
  kernel would do them: ``r·(c_in·k·k + c_out) + nnz(mask)`` multiply-adds per output position.
* :class:`FixedStatBatchNorm2d` — a ``BatchNorm2d`` that always normalises with its running statistics (never
  batch statistics, never updating them) but has trainable affine ``weight``/``bias``: a FrozenBatchNorm2d whose
  scale factors can be learned (Network Slimming on torchvision's frozen-BN detectors).

Compound modules expose ``macs_per_position()`` (multiply-adds per output spatial position and sample) and
``flops_kind``; :func:`edp_det.count_flops` counts them as one unit through that protocol.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.block import LowRankShapes

__all__ = ["MaskedConv2d", "LowRankSparseConv2d", "FixedStatBatchNorm2d"]


class MaskedConv2d(nn.Conv2d):
    """``conv(x, weight ⊙ mask)``; ``mask`` is a bool buffer shaped like ``weight`` (saved with the state dict).

    The mask is applied in the forward pass (masked entries get no gradient) and :meth:`apply_mask` zeroes them
    in the parameter itself (call it after every optimizer step so that weight decay/momentum cannot revive them).
    """

    flops_kind = "masked_conv"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> "MaskedConv2d":
        if conv.groups != 1:
            raise TypeError("MaskedConv2d supports groups=1 only")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, bias=conv.bias is not None)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
            if mask is not None:
                new.mask.copy_(mask.to(torch.bool))
            new.apply_mask()
        new.weight.requires_grad_(conv.weight.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.weight.mul_(self.mask)

    def nnz(self) -> int:
        return int(self.mask.count_nonzero())

    def macs_per_position(self) -> int:
        return self.nnz()


class LowRankSparseConv2d(LowRankShapes, nn.Module):
    """``y = conv(x, β·θ' + S ⊙ mask) + bias``.

    Children: ``basis`` (Conv2d c_in → r, k×k, the original stride/padding/dilation, no bias), ``coeff``
    (Conv2d r → c_out, 1×1, carries the bias if any) and ``sparse`` (:class:`MaskedConv2d` c_in → c_out, k×k, no
    bias). Shapes: ``[N, c_in, H, W] → [N, c_out, H', W']`` as the convolution it replaces.
    """

    flops_kind = "lowrank_sparse"

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.basis = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                               bias=False)
        self.coeff = nn.Conv2d(rank, out_channels, 1, bias=bias)
        self.sparse = MaskedConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, bias=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "LowRankSparseConv2d":
        """Function-preserving: β·θ' = the rank-``rank`` truncated SVD of the conv's weight, S = the residual."""
        from edp_det.ops.block import balanced_svd_factors

        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError("LowRankSparseConv2d supports groups=1, zero-padded convs with integer padding only")
        c_out, c_in, kh, kw = conv.weight.shape
        rank = max(1, min(int(rank), c_out, c_in * kh * kw))
        new = cls(c_in, c_out, rank, (kh, kw), conv.stride, conv.padding, conv.dilation, bias=conv.bias is not None)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        w = conv.weight.detach().reshape(c_out, -1).double()
        beta, theta = balanced_svd_factors(w, rank)
        with torch.no_grad():
            new.coeff.weight.copy_(beta.view(c_out, rank, 1, 1))
            new.basis.weight.copy_(theta.view(rank, c_in, kh, kw))
            new.sparse.weight.copy_((w - beta @ theta).view(c_out, c_in, kh, kw))
            if conv.bias is not None:
                new.coeff.bias.copy_(conv.bias)
        new.requires_grad_(conv.weight.requires_grad)
        return new

    # ------------------------------------------------------------------ shapes (from LowRankShapes)
    def lowrank_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = self.coeff.weight.reshape(self.out_channels, self.rank) @ self.basis.weight.reshape(self.rank, -1)
        return w.view(self.out_channels, self.in_channels, kh, kw)

    def effective_weight(self) -> torch.Tensor:
        return self.lowrank_weight() + self.sparse.weight * self.sparse.mask

    # ------------------------------------------------------------------ forward / costs
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.basis
        return F.conv2d(x, self.effective_weight(), self.coeff.bias, b.stride, b.padding, b.dilation)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.sparse.apply_mask()

    def macs_per_position(self) -> int:
        """Multiply-adds per output position with a sparse kernel for S: ``r·(c_in·k·k + c_out) + nnz``."""
        kk = self.kernel_size[0] * self.kernel_size[1]
        return self.rank * (self.in_channels * kk + self.out_channels) + self.sparse.nnz()

    def dense_macs_per_position(self) -> int:
        """Multiply-adds per output position as executed here (one dense conv with the effective kernel)."""
        kk = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels * self.out_channels * kk

    def extra_repr(self) -> str:
        return (f"c_in={self.in_channels}, rank={self.rank}, c_out={self.out_channels}, k={self.kernel_size}, "
                f"sparse_nnz={self.sparse.nnz()}")


class FixedStatBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with its running statistics in train and eval mode alike (they never change);
    ``weight`` (γ) and ``bias`` are trainable parameters. Same function as a FrozenBatchNorm2d with equal
    buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    @classmethod
    def from_frozen(cls, fbn: FrozenBatchNorm2d) -> "FixedStatBatchNorm2d":
        n = fbn.weight.numel()
        new = cls(n, eps=fbn.eps, affine=True, track_running_stats=True)
        new.to(device=fbn.weight.device, dtype=fbn.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(fbn.weight)
            new.bias.copy_(fbn.bias)
            new.running_mean.copy_(fbn.running_mean)
            new.running_var.copy_(fbn.running_var)
        return new

    def to_frozen(self) -> FrozenBatchNorm2d:
        fbn = FrozenBatchNorm2d(self.num_features, eps=self.eps)
        fbn.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            fbn.weight.copy_(self.weight)
            fbn.bias.copy_(self.bias)
            fbn.running_mean.copy_(self.running_mean)
            fbn.running_var.copy_(self.running_var)
        return fbn
