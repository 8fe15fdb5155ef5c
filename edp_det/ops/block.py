"""The compressed-aware block: a k×k convolution θ' followed by a 1×1 convolution β.

A convolution ``θ`` of shape ``(c_out, c_in, k, k)`` is rewritten as

    y = β ∗ (θ' ∗ x),   θ' : (r, c_in, k, k) (``basis``),   β : (c_out, r, 1, 1) (``coeff``)

with ``r = min(c_out, c_in·k·k)`` initially (full rank: nothing is lost and a 1×1 conv is never blown up to
``c_out × c_out``). ``θ'`` keeps the original stride, padding and dilation; the original bias (if any) lives on β.

Because θ' and β are consecutive linear maps, the block can compute the same output either as two convolutions
or as one convolution with the *effective kernel* ``W = β·θ'`` (shape ``(c_out, c_in, k, k)``). Both give
identical outputs and gradients; which one is cheaper depends on the batch × output positions against r.
``forward_mode`` chooses: ``"two_conv"``, ``"effective"`` or ``"auto"`` (per call, by multiply-add count).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FORWARD_MODES = ("auto", "two_conv", "effective")


def balanced_svd_factors(w2d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``β = U_r √S_r`` ``(c_out, r)`` and ``θ' = √S_r V_rᵀ`` ``(r, n)`` of ``w2d = U S Vᵀ``, in float64.

    Computed from the symmetric eigendecomposition of the smaller Gram matrix (``W Wᵀ`` or ``Wᵀ W``) rather than a
    direct SVD: LAPACK's SVD of the wide 3×3-conv matrices (e.g. 512×4608) is much slower on CPU and dominated the
    time of ``decompose`` on a ResNet-50. The eigenvector basis is orthonormal to rounding, so the
    product stays exact at any condition number (full rank: ``β θ' = U Uᵀ W = W``); the singular values are taken
    as the norms of the projections (``‖u_jᵀ W‖``, resp. ``‖W v_j‖``), columns sorted by them, descending.
    """
    w = w2d.double()
    c_out, n = w.shape
    if c_out <= n:
        u = torch.linalg.eigh(w @ w.T).eigenvectors        # (c_out, c_out)
        proj = u.T @ w                                      # rows s_j v_jᵀ
        s = proj.norm(dim=1)
        order = torch.argsort(s, descending=True)[:r]
        u, proj, s = u[:, order], proj[order], s[order]
        root = s.sqrt()
        beta = u * root
        theta = torch.where(root[:, None] > 0, proj / root.clamp_min(torch.finfo(w.dtype).tiny)[:, None],
                            torch.zeros_like(proj))
    else:
        v = torch.linalg.eigh(w.T @ w).eigenvectors        # (n, n)
        proj = w @ v                                        # columns s_j u_j
        s = proj.norm(dim=0)
        order = torch.argsort(s, descending=True)[:r]
        v, proj, s = v[:, order], proj[:, order], s[order]
        root = s.sqrt()
        beta = torch.where(root > 0, proj / root.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(proj))
        theta = root[:, None] * v.T
    return beta, theta


class LowRankShapes:
    """Shape properties of a module holding ``basis`` (c_in → r, k×k) and ``coeff`` (r → c_out, 1×1) convs."""

    @property
    def in_channels(self) -> int:
        return self.basis.in_channels

    @property
    def out_channels(self) -> int:
        return self.coeff.out_channels

    @property
    def rank(self) -> int:
        return self.basis.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.basis.kernel_size


class CompressedAwareConv2d(LowRankShapes, nn.Module):
    """``coeff(basis(x))`` with ``basis``: Conv2d(c_in → r, k×k) and ``coeff``: Conv2d(r → c_out, 1×1).

    Shapes: input ``[N, c_in, H, W]`` → output ``[N, c_out, H', W']`` with ``H', W'`` as the original conv.

    Attributes:
        basis: θ', ``weight`` of shape ``(r, c_in, k, k)``, no bias.
        coeff: β, ``weight`` of shape ``(c_out, r, 1, 1)``, bias = the original conv's bias (or a folded
            FrozenBatchNorm2d shift), else None.
        orig_in_channels / orig_out_channels: channel counts of the convolution this block replaced; used to
            express FLOPs cuts relative to the undecomposed network.
        channel_prunable: True where the block's output channels are free (not tied to a residual add), i.e.
            where row groups of β may be removed.
        norm_name: qualified name (relative to the model root) of the normalisation layer consuming this
            block's output, whose affine parameters belong to the block's row groups; None if there is none.
        forward_mode: "auto" | "two_conv" | "effective".
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = False, *, orig_in_channels: int | None = None,
                 orig_out_channels: int | None = None, channel_prunable: bool = False,
                 forward_mode: str = "auto"):
        super().__init__()
        self.basis = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, bias=False)
        self.coeff = nn.Conv2d(rank, out_channels, 1, bias=bias)
        self.orig_in_channels = int(orig_in_channels if orig_in_channels is not None else in_channels)
        self.orig_out_channels = int(orig_out_channels if orig_out_channels is not None else out_channels)
        self.channel_prunable = bool(channel_prunable)
        self.norm_name: str | None = None
        self.forward_mode = forward_mode

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, init: str = "svd", *, channel_prunable: bool = False,
                  rank: int | None = None) -> "CompressedAwareConv2d":
        """Build a block computing exactly what ``conv`` computes.

        ``init="svd"``: ``θ_2d = U S Vᵀ``; ``β = U √S`` and ``θ' = √S Vᵀ`` so that β's columns are ordered by
        singular value and column norms equal ``√s_j`` (the L2,1 prox removes the weakest directions first).
        ``init="identity"``: ``θ' = θ``, ``β = I`` (only where ``c_out ≤ c_in·k·k``; other layers fall back to
        SVD and a debug message is logged).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CompressedAwareConv2d.from_conv expects nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise TypeError(f"grouped convolutions (groups={conv.groups}) are not supported")
        if conv.padding_mode != "zeros":
            raise TypeError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise TypeError(f"string padding {conv.padding!r} is not supported; use explicit integers")
        if init not in ("svd", "identity"):
            raise ValueError(f"init must be 'svd' or 'identity', got {init!r}")
        c_out, c_in, kh, kw = conv.weight.shape
        full = min(c_out, c_in * kh * kw)
        r = full if rank is None else int(rank)
        if not 0 <= r <= full:
            raise ValueError(f"rank must be in [0, {full}], got {rank}")
        block = cls(c_in, c_out, r, (kh, kw), conv.stride, conv.padding, conv.dilation, bias=conv.bias is not None,
                    channel_prunable=channel_prunable)
        block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        w2d = conv.weight.detach().reshape(c_out, -1)
        with torch.no_grad():
            if init == "identity" and r == c_out == full and rank is None:
                block.basis.weight.copy_(conv.weight.detach())
                block.coeff.weight.copy_(torch.eye(c_out, dtype=w2d.dtype, device=w2d.device).view(c_out, c_out, 1, 1))
            else:
                if init == "identity":
                    logger.debug("identity init impossible for %s (c_out=%d > c_in·k·k=%d); using svd",
                                 tuple(conv.weight.shape), c_out, c_in * kh * kw)
                beta, theta = balanced_svd_factors(w2d, r)
                block.coeff.weight.copy_(beta.to(w2d.dtype).view(c_out, r, 1, 1))
                block.basis.weight.copy_(theta.to(w2d.dtype).view(r, c_in, kh, kw))
            if conv.bias is not None:
                block.coeff.bias.copy_(conv.bias.detach())
        block.basis.weight.requires_grad_(conv.weight.requires_grad)
        block.coeff.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            block.coeff.bias.requires_grad_(conv.bias.requires_grad)
        return block

    # ------------------------------------------------------------------ shapes (from LowRankShapes)
    def beta_2d(self) -> torch.Tensor:
        """β as a ``(c_out, r)`` view of ``coeff.weight``."""
        return self.coeff.weight.view(self.out_channels, self.rank)

    def effective_weight(self) -> torch.Tensor:
        """``W = β·θ'`` of shape ``(c_out, c_in, k, k)`` (differentiable)."""
        kh, kw = self.kernel_size
        w = self.coeff.weight.reshape(self.out_channels, self.rank) @ self.basis.weight.reshape(self.rank, -1)
        return w.view(self.out_channels, self.in_channels, kh, kw)

    def merge_cost_ratio(self) -> float:
        """Eq. (14): params of the merged conv over params of the two convs (≤ 1 means merging is no worse)."""
        kk = self.kernel_size[0] * self.kernel_size[1]
        merged = self.in_channels * self.out_channels * kk
        split = self.rank * (self.in_channels * kk + self.out_channels)
        return merged / split if split else math.inf

    # ------------------------------------------------------------------ forward
    def _use_effective(self, x: torch.Tensor) -> bool:
        if self.forward_mode == "effective":
            return True
        if self.forward_mode == "two_conv":
            return False
        # "auto": multiply-adds per call, forward plus the backward passes autograd will run. Each convolution costs
        # one pass forward, one for its weight gradient (if its weights learn) and one for its input gradient (if
        # that is needed); the product W = β·θ' costs one pass forward and one per learning factor backward.
        # With everything trainable both sides scale by 3 and this is the forward comparison; it differs for the
        # stem (input needs no gradient), frozen blocks and no_grad evaluation.
        kh, kw = self.kernel_size
        kk = kh * kw
        n, _, h, w = x.shape
        sh, sw = self.basis.stride
        dh, dw = self.basis.dilation
        ph, pw = self.basis.padding
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        positions = n * max(ho, 0) * max(wo, 0)
        c_in, r, c_out = self.in_channels, self.rank, self.out_channels
        grad = torch.is_grad_enabled()
        g_theta = grad and self.basis.weight.requires_grad
        g_beta = grad and self.coeff.weight.requires_grad
        g_x = grad and x.requires_grad
        two_conv = (positions * r * c_in * kk * (1 + g_theta + g_x)
                    + positions * r * c_out * (1 + g_beta + (g_theta or g_x)))
        effective = (positions * c_out * c_in * kk * (1 + (g_theta or g_beta) + g_x)
                     + c_out * r * c_in * kk * (1 + g_beta + g_theta))
        return effective < two_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_effective(x):
            b = self.basis
            return F.conv2d(x, self.effective_weight(), self.coeff.bias, b.stride, b.padding, b.dilation)
        return self.coeff(self.basis(x))

    def extra_repr(self) -> str:
        return (f"c_in={self.in_channels}, rank={self.rank}, c_out={self.out_channels}, k={self.kernel_size}, "
                f"channel_prunable={self.channel_prunable}, mode={self.forward_mode}")
