"""``lrs`` — learning in a low-rank + sparse decomposition form (Guo, Xie, Xu, Xing, IEEE Access 2019).

Structure (``prepare``): every conv of the backbone body becomes a :class:`edp_det.ops.layers.LowRankSparseConv2d`,
``W = β·θ' + S``: a rank-``r`` product (``r = ceil(compress.lrs_rank_ratio · full rank)``, default 0.5) plus a
dense-shaped sparse matrix ``S``. It is initialised function-preservingly (β·θ' = the truncated SVD of the conv,
S = the residual), so pretrained weights carry over; from scratch it is simply another parametrisation.

Training ``[0, compress.epoch_es)``: task loss + ``λ‖S‖₁`` (λ = ``compress.lrs_lambda``, default 1e-3),
applied as the proximal step ``S ← sign(S)·max(|S| − lr·λ, 0)`` after each optimizer step (exact zeros; SGD
momentum of zeroed entries is cleared).

Prune point: one global allocation over all layers removes the low-energy entries of S and the weakest singular
directions of β·θ' (re-factorised by SVD), in ascending order of *energy per FLOP saved* (an entry's ``S_ij²``, a
direction's ``σ_j²``, each over the layer's ``‖W‖²`` and over the FLOPs its removal saves), until the counted
backbone FLOPs cut reaches ``compress.flops_target``; the strongest direction of each layer is kept. A layer for
which low-rank + sparse would cost more than the dense conv is turned back into one dense conv (``W`` unchanged).
Fine-tuning uses masked sparse convolution: the removed entries' mask is fixed, applied in the forward pass and
re-applied to ``S`` after every optimizer step (so weight decay / momentum cannot revive them).

FLOPs, two numbers (both in ``pm_report.json``): ``achieved_r_flops`` counts only the non-zero (unmasked) sparse
weights — what a sparse kernel would execute, and what ``count_flops`` / ``metrics.json`` report; ``r_flops_dense``
is the cut as executed here, where each layer runs as one dense conv with the effective kernel ``β·θ' + S⊙mask``
(the measured FPS reflects this dense execution, typically no faster than the baseline).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from edp_det.edp.budget import scope_prefixes
from edp_det.ops.adapter import in_scope
from edp_det.ops.flops import count_flops
from edp_det.ops.graph import build_channel_graph, get_submodule, set_submodule, unwrap_model
from edp_det.ops.layers import LowRankSparseConv2d
from edp_det.edp.regularizer import zero_momentum
from edp_det.methods.base import PruneResult
from edp_det.methods.common import PrunePointMethod
from edp_det.runtime.schema import CompressOptions, option

logger = logging.getLogger(__name__)

__all__ = ["LRSMethod", "allocate_lowrank_sparse", "lowrank_sparse_layers", "finalize_lowrank_sparse"]


def lowrank_sparse_layers(model) -> list[tuple[str, LowRankSparseConv2d]]:
    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, LowRankSparseConv2d)]


# ------------------------------------------------------------------------------------------------ allocation
def allocate_lowrank_sparse(layers: list[dict], flops_target: float, orig_flops: float, other_flops: float):
    """Global FLOPs-target allocation of ranks and sparse entries.

    ``layers``: per layer ``{"pos", "ci", "co", "kk", "r", "s2" (σ_j², descending, length r), "energy",
    "entries" (energies of the live sparse entries, or None), "nnz"}``; ``orig_flops``: scope FLOPs of the
    original network; ``other_flops``: scope FLOPs outside these layers. Candidates are removed in ascending
    ``energy / (layer energy · FLOPs saved)``. Per layer the cost is ``2·pos·min(ci·co·kk, r·(ci·kk+co) + nnz)``.

    Returns ``(plans, achieved)``: per layer ``{"cols": removed direction indices, "entries": removed entry
    positions (into ``entries``), "dense": bool}``; ``achieved`` = 1 − FLOPs / orig_flops.
    """
    lay, kind, idx, score = [], [], [], []
    for i, L in enumerate(layers):
        e = max(float(L["energy"]), 1e-300)
        if L["r"] > 1:
            j = torch.arange(1, L["r"])
            lay.append(torch.full((len(j),), i, dtype=torch.int64))
            kind.append(torch.zeros(len(j), dtype=torch.int64))
            idx.append(j)
            score.append((L["s2"][1:].double().cpu() / e / (L["pos"] * (L["ci"] * L["kk"] + L["co"]) or 1)))
        ent = L.get("entries")
        if ent is not None and ent.numel():
            lay.append(torch.full((ent.numel(),), i, dtype=torch.int64))
            kind.append(torch.ones(ent.numel(), dtype=torch.int64))
            idx.append(torch.arange(ent.numel()))
            score.append(ent.double().cpu() / e / max(L["pos"], 1))
    n_layers = len(layers)
    pos = torch.tensor([L["pos"] for L in layers], dtype=torch.float64)
    dense = torch.tensor([L["ci"] * L["co"] * L["kk"] for L in layers], dtype=torch.float64)
    per_rank = torch.tensor([L["ci"] * L["kk"] + L["co"] for L in layers], dtype=torch.float64)
    r0 = torch.tensor([L["r"] for L in layers], dtype=torch.float64)
    nnz0 = torch.tensor([L["nnz"] for L in layers], dtype=torch.float64)

    if score:
        lay, kind, idx, score = torch.cat(lay), torch.cat(kind), torch.cat(idx), torch.cat(score)
        order = torch.sort(score, stable=True).indices
        lay, kind, idx = lay[order], kind[order], idx[order]
    else:
        lay = kind = idx = torch.zeros(0, dtype=torch.int64)
    n = len(lay)
    key = lay * 2 + kind

    def costs(k: int):
        removed = torch.bincount(key[:k], minlength=2 * n_layers).view(n_layers, 2).double()
        split = (r0 - removed[:, 0]) * per_rank + (nnz0 - removed[:, 1])
        return 2 * pos * torch.minimum(dense, split), split < dense

    def cut(k: int) -> float:
        return 1.0 - (float(costs(k)[0].sum()) + other_flops) / orig_flops

    if cut(n) < flops_target:
        raise ValueError(f"flops_target={flops_target:.4f} cannot be reached: removing every candidate gives a cut "
                         f"of {cut(n):.4f}")
    lo, hi = -1, n
    if cut(0) >= flops_target:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cut(mid) >= flops_target:
            hi = mid
        else:
            lo = mid
    _, is_split = costs(hi)
    prefix = key[:hi]
    grouped = idx[:hi][torch.sort(prefix, stable=True).indices]      # removals grouped by (layer, kind)
    parts = torch.split(grouped, torch.bincount(prefix, minlength=2 * n_layers).tolist())
    plans = [{"cols": parts[2 * i], "entries": parts[2 * i + 1], "dense": not bool(is_split[i])}
             for i in range(n_layers)]
    return plans, cut(hi)


def scope_flops(model, input_size) -> tuple[object, list[str], int]:
    """(FlopsReport, scope prefixes, scope FLOPs) of ``model`` at ``input_size``."""
    rep = count_flops(model, input_size=input_size)
    prefixes = scope_prefixes(model)
    total = sum(m.flops for m in rep.modules if in_scope(m.name, prefixes))
    return rep, prefixes, total


@torch.no_grad()
def finalize_lowrank_sparse(root: nn.Module, name: str, beta: torch.Tensor, theta: torch.Tensor,
                            sparse: torch.Tensor | None, mask: torch.Tensor | None, ref: nn.Module,
                            bias: torch.Tensor | None, dense: bool) -> nn.Module:
    """Put the final module for layer ``name``: a dense ``nn.Conv2d`` with ``β·θ' + S⊙mask`` when ``dense``,
    else a LowRankSparseConv2d (rank = β's columns, ``mask`` fixed). ``ref`` supplies conv geometry/dtype."""
    co, r = beta.shape
    ci = ref.in_channels
    kh, kw = ref.kernel_size
    geo = ref.basis if isinstance(ref, LowRankSparseConv2d) else ref
    dev, dt = beta.device, geo.weight.dtype
    w_lr = (beta.double() @ theta.double()).view(co, ci, kh, kw)
    s = torch.zeros_like(w_lr) if sparse is None else sparse.double() * (mask if mask is not None else 1)
    grad = geo.weight.requires_grad
    if dense:
        new = nn.Conv2d(ci, co, (kh, kw), stride=geo.stride, padding=geo.padding, dilation=geo.dilation,
                        bias=bias is not None).to(device=dev, dtype=dt)
        new.weight.copy_((w_lr + s).to(dt))
    else:
        new = LowRankSparseConv2d(ci, co, r, (kh, kw), geo.stride, geo.padding, geo.dilation,
                                  bias=bias is not None).to(device=dev, dtype=dt)
        new.coeff.weight.copy_(beta.to(dt).view(co, r, 1, 1))
        new.basis.weight.copy_(theta.to(dt).view(r, ci, kh, kw))
        m = torch.zeros(co, ci, kh, kw, dtype=torch.bool, device=dev) if mask is None else mask.to(torch.bool)
        new.sparse.mask.copy_(m)
        new.sparse.weight.copy_(s.to(dt))
        new.apply_mask()
    if bias is not None:
        (new.bias if dense else new.coeff.bias).copy_(bias.to(dt))
    new.requires_grad_(grad)
    set_submodule(root, name, new)
    return new


def layer_entry(name, mod, before, after, dense, flops_before, flops_after, **extra) -> dict:
    d = {"name": name, "kernel": list(mod.kernel_size), "before": list(before), "after": list(after),
         "merged": bool(dense), "flops_before": int(flops_before), "flops_after": int(flops_after)}
    d.update(extra)
    return d


def format_layers(layers: list[dict], summary: str) -> str:
    lines = [f"{'layer':<44} {'k':>3} {'c_in':>5} {'rank':>10} {'c_out':>5} {'dense':>5} {'sparse nnz':>12} "
             f"{'MFLOPs':>16}"]
    for l in layers:
        k = l["kernel"][0]
        lines.append(f"{l['name']:<44} {k:>3} {l['after'][0]:>5} {l['before'][1]:>4}->"
                     f"{'-' if l['merged'] else l['after'][1]:<5} {l['after'][2]:>5} "
                     f"{'yes' if l['merged'] else 'no':>5} {l.get('sparse_nnz', 0):>12} "
                     f"{l['flops_before'] / 1e6:>7.2f}->{l['flops_after'] / 1e6:<7.2f}")
    lines.append(summary)
    return "\n".join(lines)


class MaskedFineTuneMixin:
    """After the prune point: re-apply every LowRankSparseConv2d mask after each optimizer step."""

    def _mask_after_step(self, model) -> None:
        for _, m in lowrank_sparse_layers(model):
            m.apply_mask()


@dataclass
class LRSOptions(CompressOptions):
    lrs_lambda: float = option(1e-3, "λ of the L1 penalty on the sparse part S", gt=0, old="method_args.lrs_lambda")
    lrs_rank_ratio: float = option(0.5, "rank of the low-rank part as a fraction of each layer's full rank",
                                   gt=0, le=1, old="method_args.lrs_rank_ratio")


class LRSMethod(MaskedFineTuneMixin, PrunePointMethod):
    name = "lrs"
    summary = "low-rank + sparse form trained with L1 on the sparse part"
    Options = LRSOptions
    regularized = True

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        self.lam = self.options.lrs_lambda
        self.rank_ratio = self.options.lrs_rank_ratio
        self.optimizer = None
        self._positions: dict[str, int] | None = None

    def prepare(self, model):
        root = unwrap_model(model)
        if self.pruned or lowrank_sparse_layers(root):
            return model
        for node in build_channel_graph(root, scope="backbone"):
            conv = get_submodule(root, node.name)
            if not isinstance(conv, nn.Conv2d) or not conv.weight.requires_grad:
                continue
            c_out, c_in, kh, kw = conv.weight.shape
            r = max(1, math.ceil(self.rank_ratio * min(c_out, c_in * kh * kw)))
            set_submodule(root, node.name, LowRankSparseConv2d.from_conv(conv, r))
        return model

    def attach(self, model, optimizer) -> None:
        self.optimizer = optimizer

    @torch.no_grad()
    def after_step(self, model, lr: float, epoch: int) -> None:
        if self.pruned:
            self._mask_after_step(model)
            return
        if not self.regularizing(epoch):
            return
        t = lr * self.lam
        state = self.optimizer.state if self.optimizer is not None else None
        for _, m in lowrank_sparse_layers(model):
            s = m.sparse.weight
            s.copy_(torch.sign(s) * (s.abs() - t).clamp_min(0))
            if state is not None:
                zero_momentum(state, s, s == 0)

    @torch.no_grad()
    def epoch_stats(self, model, input_size) -> dict:
        """Sparse ratios of params and FLOPs of the LRS layers if their zero S entries were removed now."""
        if self.pruned:
            return {}
        layers = lowrank_sparse_layers(model)
        if not layers:
            return {}
        if self._positions is None:
            rep = count_flops(model, input_size=input_size)
            self._positions = {m.name: m.positions for m in rep.modules}
        p_now = p_orig = f_now = f_orig = 0
        zeros = total = 0
        for name, m in layers:
            kk = m.kernel_size[0] * m.kernel_size[1]
            dense = m.in_channels * m.out_channels * kk
            live = m.sparse.weight.ne(0) & m.sparse.mask
            split = m.rank * (m.in_channels * kk + m.out_channels) + int(live.sum())
            pos = self._positions.get(name, 0)
            p_now, p_orig = p_now + min(dense, split), p_orig + dense
            f_now, f_orig = f_now + pos * min(dense, split), f_orig + pos * dense
            zeros += int((~live).sum())
            total += live.numel()
        return {"sparse_params": 1 - p_now / p_orig, "sparse_flops": 1 - f_now / f_orig if f_orig else None,
                "sparse_S": zeros / max(total, 1)}

    @torch.no_grad()
    def prune(self, model, input_size) -> PruneResult:
        root = unwrap_model(model)
        mods = lowrank_sparse_layers(root)
        if not mods:
            raise ValueError("lrs: the model has no LowRankSparseConv2d layers (prepare() was not run)")
        rep, prefixes, _ = scope_flops(root, input_size)
        recs = {m.name: m for m in rep.modules}
        infos, factors = [], []
        other = 0
        lrs_names = {n for n, _ in mods}
        for m in rep.modules:
            if in_scope(m.name, prefixes) and m.name not in lrs_names:
                other += m.flops
        orig = other
        from edp_det.ops.block import balanced_svd_factors
        for name, m in mods:
            kk = m.kernel_size[0] * m.kernel_size[1]
            pos = recs[name].positions
            w_lr = m.lowrank_weight().detach().reshape(m.out_channels, -1).double()
            beta, theta = balanced_svd_factors(w_lr, m.rank)          # columns by singular value
            s2 = (beta.norm(dim=0) * theta.norm(dim=1)).pow(2)
            s = (m.sparse.weight.detach() * m.sparse.mask).double().flatten()
            live = torch.nonzero(m.sparse.mask.flatten()).flatten()
            energy = float((w_lr.flatten() + s).pow(2).sum())
            infos.append({"pos": pos, "ci": m.in_channels, "co": m.out_channels, "kk": kk, "r": m.rank,
                          "s2": s2, "energy": energy, "entries": s[live].pow(2), "nnz": int(live.numel())})
            factors.append((beta, theta, s, live))
            orig += 2 * pos * m.in_channels * m.out_channels * kk
        plans, achieved_analytic = allocate_lowrank_sparse(infos, self.flops_target, orig, other)
        layers = []
        for (name, m), info, (beta, theta, s, live), plan in zip(mods, infos, factors, plans):
            keep = torch.ones(m.rank, dtype=torch.bool)
            keep[plan["cols"]] = False
            mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
            mask[live] = True
            mask[live[plan["entries"].to(live.device)]] = False
            kh, kw = m.kernel_size
            shape = (m.out_channels, m.in_channels, kh, kw)
            bias = m.coeff.bias.detach().clone() if m.coeff.bias is not None else None
            kidx = torch.nonzero(keep).flatten().to(beta.device)
            dense = plan["dense"]
            if dense:   # low-rank + sparse does not pay here: keep W as it is, one dense conv
                new = finalize_lowrank_sparse(root, name, beta, theta, s.view(shape), m.sparse.mask, m, bias, True)
            else:
                new = finalize_lowrank_sparse(root, name, beta[:, kidx], theta[kidx], s.view(shape),
                                              mask.view(shape), m, bias, False)
            kk = info["kk"]
            fb = 2 * info["pos"] * min(info["ci"] * info["co"] * kk, m.rank * (info["ci"] * kk + info["co"]) +
                                       info["nnz"])
            nnz = 0 if dense else new.sparse.nnz()
            fa = 2 * info["pos"] * (info["ci"] * info["co"] * kk if dense else new.macs_per_position())
            layers.append(layer_entry(name, new, (info["ci"], m.rank, info["co"]),
                                      (info["ci"], min(info["co"], info["ci"] * kk) if dense else new.rank, info["co"]),
                                      dense, fb, fa, sparse_nnz=nnz, sparse_nnz_before=info["nnz"]))
        self.pruned = True
        return lowrank_sparse_report(root, input_size, self.name, self.flops_target, layers,
                                     achieved_analytic=achieved_analytic, lrs_lambda=self.lam,
                                     lrs_rank_ratio=self.rank_ratio)


def lowrank_sparse_report(root, input_size, method: str, target: float, layers: list[dict], **extra) -> PruneResult:
    """Recount the real model; the pm_report dict of LRS-type methods (counted and dense-execution FLOPs)."""
    rep, prefixes, flops_after = scope_flops(root, input_size)
    dense_exec = 0
    for m in rep.modules:
        if not in_scope(m.name, prefixes):
            continue
        mod = root.get_submodule(m.name)
        if isinstance(mod, LowRankSparseConv2d):
            dense_exec += 2 * m.positions * mod.dense_macs_per_position()
        else:
            dense_exec += m.flops
    orig = dense_exec   # every layer executes as a dense conv of its original shape (effective kernel)
    achieved = 1 - flops_after / orig
    out = {"method": method, "layers": layers, "requested_r_flops": target, "achieved_r_flops": achieved,
           "r_flops_dense": 1 - dense_exec / orig, "flops_original": orig, "flops_after": flops_after,
           "flops_dense_execution": dense_exec, "params_after": rep.params, "input_size": list(rep.input_size),
           "sparse_nnz": sum(l.get("sparse_nnz", 0) for l in layers)}
    out.update(extra)
    table = format_layers(layers, f"FLOPs {orig / 1e9:.4f} G -> {flops_after / 1e9:.4f} G counted "
                                         f"(non-zero sparse weights only; R_FLOPs requested {target:.1%}, achieved "
                                         f"{achieved:.1%}), {dense_exec / 1e9:.4f} G executed densely "
                                         f"(R_FLOPs {1 - dense_exec / orig:.1%})")
    logger.info("%s: R_FLOPs achieved %.4f (requested %.4f); dense execution %.4f", method, achieved, target,
                1 - dense_exec / orig)
    return PruneResult(report=out, table=table)
