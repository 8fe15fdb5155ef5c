"""``admm_lrs`` — low-rank + structured-sparse approximation of each layer's responses, solved by ADMM (after Yu,
Liu, Wang, Tao, "On Compressing Deep Models by Low Rank and Sparse Decomposition", CVPR 2017).

Schedule: train normally for ``compress.epoch_es`` epochs. At the prune point:

1. **Calibration** (engine → :meth:`ADMMLRSMethod.calibrate`): ``compress.admm_batches`` training batches
   (default 2) run through the network in eval mode; the input of every backbone conv is recorded as
   ``admm_samples`` (default 2048) randomly sampled receptive-field patches ``X`` (``c_in·k·k × P``).
2. **Budget**: ranks are allocated globally by singular-value energy per FLOP (as ``lrs``) on the trained weights
   to a cut of ``R + φ(1 − R)`` (``R = compress.flops_target``, ``φ = admm_sparse_share``, default 0.2); the FLOPs
   this leaves below the ``1 − R`` budget go to the sparse parts, split over the low-rank layers in proportion to
   the FLOPs their truncation saved, as whole k×k kernels (structured sparsity: groups ``S[o, i, :, :]``).
   Layers where low rank does not pay stay dense.
3. **ADMM per layer**: with ``W'`` the conv weight scaled by its following (frozen/eval) BatchNorm, ``b`` the
   norm's shift and ``f`` = ReLU where the norm is followed by a ReLU (else the identity — convs feeding a residual
   addition), solve ::

       min_{L, S}  ½‖f(Z) − f(W'X + b)‖²  +  (δ/2)‖L + S − W'‖²   s.t.  Z = (L + S)X + b,
                   rank(L) ≤ r,  S has ≤ k non-zero k×k kernels

   by ADMM on the split ``Z = (L+S)X + b`` (scaled dual U, penalty ρ = ``admm_rho``, ``admm_iters`` iterations,
   default 10): the Z-step is elementwise (closed form for the ReLU case), the (L, S)-step alternates an exact
   rank-r projection in the data metric ``C = XXᵀ/P + δI`` (via its Cholesky factor) with a least-squares S
   projected on the k strongest kernels. The small prior ``δ = admm_prior·tr(C)/n`` (default 1e-2) keeps the fit
   well posed when ``P < c_in·k·k``. ``L`` and ``S`` are then unscaled by the norm's scale.
4. Every approximated conv becomes a :class:`edp_det.ops.layers.LowRankSparseConv2d` (rank-r factors + kernel-masked
   sparse conv); fine-tuning keeps the masks (re-applied after every optimizer step), as ``lrs``.

FLOPs are counted with only the unmasked sparse weights (``achieved_r_flops``); as for ``lrs`` each layer executes
densely (``r_flops_dense``, measured FPS). Own implementation; the paper is cited for the problem only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.block import balanced_svd_factors
from edp_det.edp.calibration import forward_batch
from edp_det.ops.adapter import in_scope
from edp_det.ops.graph import build_channel_graph, get_submodule, unwrap_model
from edp_det.methods.base import PruneResult
from edp_det.methods.common import PrunePointMethod
from edp_det.runtime.schema import CompressOptions, option
from edp_det.methods.lrs import (MaskedFineTuneMixin, allocate_lowrank_sparse, finalize_lowrank_sparse, layer_entry,
                  lowrank_sparse_report, scope_flops)

logger = logging.getLogger(__name__)

__all__ = ["ADMMLRSMethod", "admm_lowrank_sparse", "norm_affine"]


def norm_affine(norm: nn.Module | None, c_out: int, bias: torch.Tensor | None, ref: torch.Tensor):
    """``(a, b)`` with ``norm(conv_nobias(x) + bias) = a·conv_nobias(x) + b`` in eval mode (per channel)."""
    dt, dev = torch.float64, ref.device
    bias = torch.zeros(c_out, dtype=dt, device=dev) if bias is None else bias.detach().to(dt)
    if isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)) and getattr(norm, "running_var", None) is not None:
        w = norm.weight.detach().to(dt) if norm.weight is not None else torch.ones(c_out, dtype=dt, device=dev)
        sh = norm.bias.detach().to(dt) if norm.bias is not None else torch.zeros(c_out, dtype=dt, device=dev)
        a = w / torch.sqrt(norm.running_var.to(dt) + norm.eps)
        return a, sh + (bias - norm.running_mean.to(dt)) * a
    return torch.ones(c_out, dtype=dt, device=dev), bias


def _relu_step(t: torch.Tensor, v: torch.Tensor, rho: float) -> torch.Tensor:
    """argmin_z ½(relu(z) − t)² + ρ/2 (z − v)², elementwise."""
    z1 = ((t + rho * v) / (1 + rho)).clamp_min(0)
    f1 = 0.5 * (z1 - t) ** 2 + 0.5 * rho * (z1 - v) ** 2
    z2 = v.clamp_max(0)
    f2 = 0.5 * t ** 2 + 0.5 * rho * (z2 - v) ** 2
    return torch.where(f1 <= f2, z1, z2)


@torch.no_grad()
def admm_lowrank_sparse(w: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, relu: bool, rank: int,
                        n_kernels: int, kk: int, iters: int = 10, rho: float = 1.0, prior: float = 1e-2,
                        inner: int = 1):
    """Approximate ``w`` (``c_out × n``, ``n = c_in·kk``) as ``L + S`` on the responses to ``x`` (``n × P``).

    ``a``, ``b``: the following norm's per-channel scale and shift; ``relu``: whether a ReLU follows.
    Returns ``(beta (c_out × rank), theta (rank × n), S (c_out × n), kernel_mask (c_out × c_in))`` in the
    unscaled (conv-weight) space, float64 (computed in float32).
    """
    dt = torch.float32                  # ample for a ridge-regularised fit; float64 is much slower on CPU
    w, x, a, b = w.to(dt), x.to(dt), a.to(dt), b.to(dt)
    co, n = w.shape
    p = x.shape[1]
    ci = n // kk
    ws = a[:, None] * w                                                   # W' (scaled by the norm)
    c = x @ x.T / p
    delta = prior * float(torch.diagonal(c).mean()) + 1e-12
    c.diagonal().add_(delta)
    k_chol = torch.linalg.cholesky(c)                                     # C = K Kᵀ

    def solve_c(g):                                                        # g C⁻¹
        return torch.cholesky_solve(g.T, k_chol).T

    def project_rank(l0, v=None):
        """argmin_{rank ≤ r} ‖(L − L0) K‖: exact SVD the first time, then two subspace iterations warm-started
        from the previous right singular subspace ``v`` (n × r). Returns (β, θ, v) with L = β θ."""
        ak = l0 @ k_chol
        if v is None:
            bl, tl = balanced_svd_factors(ak, rank)
            v = torch.linalg.qr(tl.to(dt).T).Q
        else:
            for _ in range(2):
                q = torch.linalg.qr(ak @ v).Q
                v = torch.linalg.qr(ak.T @ q).Q
        bl, tl = ak @ v, v.T
        theta = torch.linalg.solve_triangular(k_chol, tl.contiguous(), upper=False, left=False)
        return bl.to(dt), theta, v

    def project_sparse(s0):
        if n_kernels <= 0:
            return torch.zeros_like(s0), torch.zeros(co, ci, dtype=torch.bool, device=s0.device)
        g = s0.view(co, ci, kk).pow(2).sum(dim=2).flatten()
        keep = torch.zeros(co * ci, dtype=torch.bool, device=s0.device)
        keep[torch.topk(g, min(n_kernels, g.numel())).indices] = True
        keep = keep.view(co, ci)
        return s0 * keep[:, :, None].expand(co, ci, kk).reshape(co, n), keep

    y = ws @ x + b[:, None]
    t = y.clamp_min(0) if relu else y
    beta, theta, vsub = project_rank(ws)
    s, kmask = project_sparse(ws - beta @ theta)
    z = y.clone()
    u = torch.zeros_like(z)
    for _ in range(max(1, iters)):
        m = beta @ theta + s
        v = m @ x + b[:, None] - u
        z = _relu_step(t, v, rho) if relu else (t + rho * v) / (1 + rho)
        r = z + u - b[:, None]
        gsol = solve_c(r @ x.T / p + delta * ws)                           # unconstrained M
        for _ in range(inner):
            beta, theta, vsub = project_rank(gsol - s, vsub)
            s, kmask = project_sparse(gsol - beta @ theta)
        u = u + z - ((beta @ theta + s) @ x + b[:, None])
    inv = torch.where(a.abs() > 1e-12, 1 / a, torch.zeros_like(a)).to(dt)
    bf, tf = _balance((inv[:, None] * beta).double(), theta.double())
    return bf, tf, (inv[:, None] * s).double(), kmask


def _balance(beta: torch.Tensor, theta: torch.Tensor):
    """The same product ``β θ`` re-factorised as ``U √Σ`` and ``√Σ Vᵀ`` (columns by singular value) via QR of the
    two thin factors and an r×r SVD."""
    qb, rb = torch.linalg.qr(beta)
    qt, rt = torch.linalg.qr(theta.T)
    u, sv, vh = torch.linalg.svd(rb @ rt.T)
    root = sv.sqrt()
    return (qb @ u) * root, root[:, None] * (vh @ qt.T)


@dataclass
class ADMMLRSOptions(CompressOptions):
    admm_batches: int = option(2, "training batches recorded for the layer responses", gt=0,
                               old="method_args.admm_batches")
    admm_samples: int = option(2048, "receptive-field patches sampled per conv", gt=0, old="method_args.admm_samples")
    admm_iters: int = option(10, "ADMM iterations per layer", gt=0, old="method_args.admm_iters")
    admm_rho: float = option(1.0, "ADMM penalty ρ", gt=0, old="method_args.admm_rho")
    admm_prior: float = option(1e-2, "prior δ (relative to tr(C)/n) keeping the fit well posed", gt=0,
                               old="method_args.admm_prior")
    admm_sparse_share: float = option(0.2, "share φ of the removed FLOPs given back to the sparse parts", ge=0,
                                      lt=1, old="method_args.admm_sparse_share")


class ADMMLRSMethod(MaskedFineTuneMixin, PrunePointMethod):
    name = "admm_lrs"
    summary = "low-rank + structured-sparse fit of layer responses by ADMM"
    Options = ADMMLRSOptions

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        o = self.options
        self.calibration_batches = o.admm_batches
        self.samples = o.admm_samples
        self.iters = o.admm_iters
        self.rho = o.admm_rho
        self.prior = o.admm_prior
        self.share = o.admm_sparse_share
        self._x: dict[str, torch.Tensor] = {}

    def after_step(self, model, lr: float, epoch: int) -> None:
        if self.pruned:
            self._mask_after_step(model)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, model, batches, device) -> None:
        """Record ``admm_samples`` input patches of every backbone conv from the given training batches."""
        root = unwrap_model(model)
        batches = list(batches)
        if not batches:
            raise ValueError("admm_lrs: no calibration batches")
        per_batch = math.ceil(self.samples / len(batches))
        gen = torch.Generator().manual_seed(0)
        store: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for node in build_channel_graph(root, scope="backbone"):
            conv = get_submodule(root, node.name)
            if not isinstance(conv, nn.Conv2d) or not conv.weight.requires_grad:
                continue

            def hook(mod, inputs, output, name=node.name):
                inp = inputs[0]
                cols = []
                for img in inp:            # one image at a time keeps the unfolded patches small
                    pat = F.unfold(img[None], mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                                   stride=mod.stride)[0]                               # (n, L)
                    k = max(1, per_batch // inp.shape[0])
                    idx = torch.randint(pat.shape[1], (k,), generator=gen).to(pat.device)
                    cols.append(pat[:, idx])
                store.setdefault(name, []).append(torch.cat(cols, dim=1))
            hooks.append(conv.register_forward_hook(hook))
        was_training = root.training
        root.eval()
        try:
            for batch in batches:
                forward_batch(root, batch, device, body_only=True)
        finally:
            for h in hooks:
                h.remove()
            root.train(was_training)
        self._x = {k: torch.cat(v, dim=1) for k, v in store.items()}
        logger.info("admm_lrs: recorded inputs of %d convs (%d samples each)", len(self._x),
                    next(iter(self._x.values())).shape[1] if self._x else 0)

    # ------------------------------------------------------------------ prune
    @torch.no_grad()
    def prune(self, model, input_size) -> PruneResult:
        root = unwrap_model(model)
        if not self._x:
            raise ValueError("admm_lrs: calibrate() must run before prune() (the engine does this when "
                             "calibration_batches > 0)")
        graph = build_channel_graph(root, scope="backbone")
        rep, prefixes, _ = scope_flops(root, input_size)
        recs = {m.name: m for m in rep.modules}
        names = [n.name for n in graph if n.name in self._x]
        other = sum(m.flops for m in rep.modules if in_scope(m.name, prefixes) and m.name not in names)
        infos = []
        orig = other
        for name in names:
            conv = get_submodule(root, name)
            node = graph.nodes[name]
            norm = get_submodule(root, node.norm) if node.norm else None
            a, _ = norm_affine(norm, conv.out_channels, conv.bias, conv.weight)
            w = a[:, None] * conv.weight.detach().reshape(conv.out_channels, -1).double()
            wf = w.float()
            gram = wf @ wf.T if wf.shape[0] <= wf.shape[1] else wf.T @ wf
            s = torch.linalg.eigvalsh(gram).double().clamp_min(0).sqrt().flip(0)   # singular values, descending
            kk = conv.kernel_size[0] * conv.kernel_size[1]
            pos = recs[name].positions
            infos.append({"pos": pos, "ci": conv.in_channels, "co": conv.out_channels, "kk": kk, "r": len(s),
                          "s2": s.pow(2), "energy": float(s.pow(2).sum()), "entries": None, "nnz": 0})
            orig += 2 * pos * conv.in_channels * conv.out_channels * kk
        target = self.flops_target
        rank_target = 1 - (1 - target) * (1 - self.share)
        plans, _ = allocate_lowrank_sparse(infos, rank_target, orig, other)
        # the FLOPs left under the (1 − R) budget go to kernels of S, in proportion to the FLOPs truncation saved
        ranks, lr_cost, saved = [], 0.0, []
        for info, plan in zip(infos, plans):
            r = info["r"] - len(plan["cols"])
            ranks.append(r)
            dense = info["ci"] * info["co"] * info["kk"]
            split = r * (info["ci"] * info["kk"] + info["co"])
            cost = 2 * info["pos"] * (dense if plan["dense"] else split)
            lr_cost += cost
            saved.append(0.0 if plan["dense"] else 2.0 * info["pos"] * (dense - split))
        budget = max(0.0, (1 - target) * orig - other - lr_cost)
        total_saved = sum(saved) or 1.0
        layers = []
        for name, info, plan, r, sv in zip(names, infos, plans, ranks, saved):
            conv = get_submodule(root, name)
            node = graph.nodes[name]
            kk = info["kk"]
            fb = 2 * info["pos"] * info["ci"] * info["co"] * kk
            bias = conv.bias.detach().clone() if conv.bias is not None else None
            if plan["dense"]:
                layers.append(layer_entry(name, conv, (info["ci"], info["r"], info["co"]),
                                          (info["ci"], info["r"], info["co"]), True, fb, fb, sparse_nnz=0))
                continue
            room = budget * sv / total_saved
            dense_room = 2 * info["pos"] * (info["ci"] * info["co"] * kk - r * (info["ci"] * kk + info["co"]))
            n_kernels = int(min(room, dense_room - 1) // (2 * info["pos"] * kk)) if info["pos"] else 0
            n_kernels = max(0, min(n_kernels, info["ci"] * info["co"]))
            norm = get_submodule(root, node.norm) if node.norm else None
            a, b = norm_affine(norm, conv.out_channels, conv.bias, conv.weight)
            relu = node.prunable or name.endswith("conv1")
            x = self._x[name].to(conv.weight.device)
            beta, theta, s, kmask = admm_lowrank_sparse(conv.weight.detach().reshape(info["co"], -1), x, a, b,
                                                        relu, r, n_kernels, kk, iters=self.iters, rho=self.rho,
                                                        prior=self.prior)
            kh, kw = conv.kernel_size
            mask = kmask[:, :, None, None].expand(info["co"], info["ci"], kh, kw)
            new = finalize_lowrank_sparse(root, name, beta, theta, s.view(info["co"], info["ci"], kh, kw), mask,
                                          conv, bias, False)
            layers.append(layer_entry(name, new, (info["ci"], info["r"], info["co"]), (info["ci"], r, info["co"]),
                                      False, fb, 2 * info["pos"] * new.macs_per_position(),
                                      sparse_nnz=new.sparse.nnz(), sparse_kernels=int(kmask.sum()), relu=relu))
        self._x = {}
        self.pruned = True
        return lowrank_sparse_report(root, input_size, self.name, target, layers, admm_iters=self.iters,
                                     admm_rho=self.rho, admm_sparse_share=self.share, admm_samples=self.samples)
