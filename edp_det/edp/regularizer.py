"""Ω(Θ) of eq. (4) and its proximal operator (eq. 11–13), applied after each optimizer step.

Groups of a block with β of shape ``(c_out, r)`` (``coeff.weight`` viewed 2-D):
  * column group j (rank):     ``β[:, j]``                                   weight λ1 (``lambda_rank``)
  * row group i (out channel): ``β[i, :]`` ∪ {bias_i} ∪ {γ_i, b_i of the following BatchNorm2d}   weight λ2
    (``lambda_channel``), only on channel-prunable blocks. The bias and affine parameters belong to the group
    so that a group shrunk to zero makes the channel output *exactly zero* (not a constant), which PM can then
    remove exactly even where zero padding is involved.

Ω(Θ) = λ1 Σ_l Σ_j ‖β_l[:, j]‖₂ + λ2 Σ_l Σ_i ‖row group i of l‖₂.

Prox (eq. 12–13): group soft-thresholding ``g ← g · max(0, 1 − α·λ/‖g‖₂)``. Eq. (11) writes the column and the row
operator as a sum, which taken literally would double β; we apply them one after the other (columns, then rows),
i.e. the standard approximation of the prox of a sum of two group norms by composition.

Interaction with the optimizer: ``prox_step(lr)`` is called after ``optimizer.step()`` with the learning rate of
that step. With SGD momentum, momentum buffer entries of groups that the prox sets exactly to zero are zeroed too
(when the optimizer is passed), so that the stale velocity does not immediately resurrect a pruned group. Under
AMP, call it only when the GradScaler did not skip the step. Under DDP all ranks hold identical parameters after
the (synchronised) optimizer step, and the prox is deterministic, so they stay identical.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from edp_det.edp.decompose import iter_blocks
from edp_det.ops.graph import get_submodule, unwrap_model

__all__ = ["EDPRegularizer", "LayerStats", "zero_momentum", "zero_optimizer_state", "OPTIMIZER_STATE_KEYS", "shrink_factors"]

#: per-parameter optimizer buffers that can move a weight: SGD momentum, Adam(W) first and second moments (and
#: AMSGrad's maximum); a group held at zero has all of them zeroed
OPTIMIZER_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

logger = logging.getLogger(__name__)


@dataclass
class LayerStats:
    name: str
    in_channels: int
    rank: int            # total columns of β
    out_channels: int
    live_rank: int       # non-zero columns
    live_channels: int   # non-zero row groups (== out_channels for blocks that are not channel-prunable)
    channel_prunable: bool


class _Entry:
    __slots__ = ("name", "block", "norm", "lam_col", "lam_row", "row_params")

    def __init__(self, name, block, norm, lam_col, lam_row):
        self.name = name
        self.block = block
        self.norm = norm
        self.lam_col = lam_col
        self.lam_row = lam_row
        # every tensor of the row group other than β, each of shape (c_out,)
        params = []
        if block.coeff.bias is not None:
            params.append(block.coeff.bias)
        if norm is not None:
            params.extend([norm.weight, norm.bias])
        self.row_params = params


class EDPRegularizer:
    """L2,1 regulariser on the β of every CompressedAwareConv2d in ``model``.

    Args:
        model: a decomposed model (DDP-wrapped is fine).
        lambda_rank: λ1 ≥ 0, on column groups of every block.
        lambda_channel: λ2 ≥ 0, on row groups of channel-prunable blocks only.
        optimizer: optional; if given, the optimizer state of groups zeroed by the prox (SGD momentum, Adam
            moments) is zeroed as well.
    """

    def __init__(self, model: nn.Module, lambda_rank: float = 1e-3, lambda_channel: float = 1e-3,
                 optimizer: torch.optim.Optimizer | None = None):
        for key, val in (("lambda_rank", lambda_rank), ("lambda_channel", lambda_channel)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not 0 <= val < math.inf:
                raise ValueError(f"{key} must be a finite number ≥ 0, got {val!r}")
        self.model = unwrap_model(model)
        self.lambda_rank = float(lambda_rank)
        self.lambda_channel = float(lambda_channel)
        self.optimizer = optimizer
        self._warned_stale = False
        self.entries: list[_Entry] = []
        for name, block in iter_blocks(self.model):
            if not block.coeff.weight.requires_grad:
                continue  # frozen layers are left alone
            norm = get_submodule(self.model, block.norm_name) if block.norm_name else None
            lam_row = self.lambda_channel if block.channel_prunable else 0.0
            self.entries.append(_Entry(name, block, norm, self.lambda_rank, lam_row))
        if not self.entries:
            raise ValueError("model has no trainable CompressedAwareConv2d blocks: call edp_det.decompose(model) first")

    # ------------------------------------------------------------------ Ω
    def penalty(self) -> torch.Tensor:
        """Ω(Θ) (eq. 4) as a differentiable scalar tensor (for logging/analysis; the prox does the shrinking)."""
        total = None
        for e in self.entries:
            beta = e.block.beta_2d()
            term = beta.new_zeros(())
            if e.lam_col > 0:
                term = term + e.lam_col * beta.norm(dim=0).sum()
            if e.lam_row > 0:
                sq = beta.pow(2).sum(dim=1)
                for p in e.row_params:
                    sq = sq + p.pow(2)
                term = term + e.lam_row * sq.sqrt().sum()
            total = term if total is None else total + term.to(total.dtype)
        return total

    # ------------------------------------------------------------------ prox
    @torch.no_grad()
    def prox_step(self, lr: float, guard=None, keep: dict | None = None) -> bool:
        """Group soft-thresholding with step ``lr`` (the learning rate of the optimizer step just taken).

        ``guard``: optional callable, asked before anything is written whenever the step would set a non-zero
        group exactly to zero. It receives ``{block name: (cols, rows)}``: bool masks of the β columns and of the
        row groups (``None`` where that kind is not regularised) that would be zero after the step, and the step
        is applied only if it returns True. It may instead return a dict of the same form: the groups the step
        may set to zero (a group it would zero that is not named there is left as it is, not shrunk); the step
        is then applied that way. ``keep``: optional ``{block name: (cols, rows)}`` bool masks (or ``None``) of
        groups the step leaves unchanged (neither shrunk nor zeroed). Returns whether the step was applied."""
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise ValueError(f"lr must be a finite number ≥ 0, got {lr!r}") from None
        if not 0 <= lr < math.inf:  # a NaN threshold compares False with every norm: it would zero every group
            raise ValueError(f"lr must be a finite number ≥ 0, got {lr!r}")
        if not self._warned_stale:
            self._check_blocks()
        groups: dict = {}
        for e in self.entries:
            if e.lam_col > 0 or e.lam_row > 0:
                w = e.block.coeff.weight
                groups.setdefault((w.device, w.dtype), []).append(e)
        plans = [_prox_scales(entries, lr) for entries in groups.values()]
        if keep:
            for plan in plans:
                plan.keep(keep)
        return self._apply_plans(plans, guard)

    @torch.no_grad()
    def scale_groups(self, factors: dict, guard=None) -> bool:
        """Multiply groups by given factors in [0, 1] instead of soft-thresholding them: ``factors`` is
        ``{block name: (column factors or None, row factors or None)}`` (a row factor scales the β row with its
        bias and norm affine entries). A group brought to zero has its optimizer state zeroed; ``guard`` as in
        :meth:`prox_step`. Returns whether the step was applied."""
        if not self._warned_stale:
            self._check_blocks()
        groups: dict = {}
        for e in self.entries:
            cf, rf = factors.get(e.name, (None, None))
            if cf is not None or rf is not None:
                w = e.block.coeff.weight
                groups.setdefault((w.device, w.dtype), []).append((e, cf, rf))
        plans = []
        for items in groups.values():
            plan = _ProxPlan([e for e, _, _ in items])
            w = items[0][0].block.coeff.weight
            for kind, (scales, columns) in enumerate(((plan.col_scale, True), (plan.row_scale, False))):
                parts = [(i, f) for i, item in enumerate(items) if (f := item[1 + kind]) is not None]
                if not parts:
                    continue
                full = torch.cat([f.to(device=w.device, dtype=w.dtype) for _, f in parts])
                if not bool(((full >= 0) & (full <= 1)).all()):    # one check for all blocks; name the first bad one
                    i = next(i for i, f in parts if not bool(((f >= 0) & (f <= 1)).all()))
                    raise ValueError(f"{items[i][0].name}: scale factors must lie in [0, 1]")
                live = torch.cat([_nonzero_groups(items[i][0], columns).to(w.dtype) for i, _ in parts])
                for (i, _), view in zip(parts, full.split([f.numel() for _, f in parts])):
                    scales[i] = view
                if columns:
                    plan.col_all, plan.col_norms = full, live
                else:
                    plan.row_all, plan.row_norms = full, live
            plans.append(plan)
        return self._apply_plans(plans, guard)

    def _apply_plans(self, plans: list, guard) -> bool:
        state = self.optimizer.state if self.optimizer is not None else None
        if guard is not None and any(plan.dying() for plan in plans):
            zero = {}
            for plan in plans:
                for e, cs, rs in zip(plan.entries, plan.col_scale, plan.row_scale):
                    zero[e.name] = (None if cs is None else cs == 0, None if rs is None else rs == 0)
            verdict = guard(zero)
            if verdict is False:
                return False
            if isinstance(verdict, dict):
                for plan in plans:
                    plan.restrict(verdict)
        for plan in plans:
            _apply_scales(plan, state)
        return True

    def _check_blocks(self) -> None:
        """Warn (once) when the model no longer holds the blocks this regulariser was built on (after
        prune_and_merge): its prox would shrink detached copies and leave the model untouched."""
        gone = 0
        for e in self.entries:
            try:
                gone += get_submodule(self.model, e.name) is not e.block
            except ValueError:
                gone += 1
        if gone:
            self._warned_stale = True
            logger.warning("EDPRegularizer: %d of its %d blocks are no longer in the model (created before "
                           "prune_and_merge?); prox_step does not change the model — build a new EDPRegularizer "
                           "on the current model if it still has CompressedAwareConv2d blocks", gone, len(self.entries))

    # ------------------------------------------------------------------ stats
    @torch.no_grad()
    def stats(self) -> list[LayerStats]:
        """Per block: total and live rank (non-zero β columns) and channels (non-zero row groups)."""
        out = []
        for e in self.entries:
            beta = e.block.beta_2d()
            live_rank = int((beta != 0).any(dim=0).sum())
            if e.block.channel_prunable:
                live = (beta != 0).any(dim=1)
                for p in e.row_params:
                    live |= p != 0
                live_channels = int(live.sum())
            else:
                live_channels = beta.shape[0]
            out.append(LayerStats(e.name, e.block.in_channels, e.block.rank, e.block.out_channels,
                                  live_rank, live_channels, e.block.channel_prunable))
        return out

    def sparsity(self, input_size=None, example_inputs=None) -> dict:
        """Sparse ratios of params and FLOPs over the decomposed layers if PM were applied now.

        Relative to the original (undecomposed) convolutions; FLOPs need the spatial size of each layer, so they
        are reported when ``input_size`` or ``example_inputs`` is given (see :func:`edp_det.count_flops`).
        Returns ``{"sparse_params": float, "sparse_flops": float | None, "live_rank": int, "live_channels": int}``.
        """
        from edp_det.edp.budget import structure_from_model

        struct = structure_from_model(self.model, input_size=input_size, example_inputs=example_inputs,
                                      need_positions=input_size is not None or example_inputs is not None)
        return struct.sparsity()


class _ProxPlan:
    """The shrink factors of one prox step for ``entries`` (one device/dtype): per entry the column and the row
    factors (``None`` where that kind has λ = 0); ``*_all`` / ``*_norms``: all blocks' factors and group norms
    concatenated (``None`` where no block regularises that kind)."""

    __slots__ = ("entries", "col_scale", "row_scale", "col_all", "row_all", "col_norms", "row_norms")

    def __init__(self, entries):
        self.entries = entries
        self.col_scale: list = [None] * len(entries)
        self.row_scale: list = [None] * len(entries)
        self.col_all = self.row_all = self.col_norms = self.row_norms = None

    def restrict(self, allowed: dict) -> None:
        """Leave unchanged (factor 1) every group the step would zero that ``allowed`` (``{block name: (cols,
        rows)}`` bool masks or ``None``) does not name; groups already zero stay zero."""
        for e, cs, rs in zip(self.entries, self.col_scale, self.row_scale):
            ok_c, ok_r = allowed.get(e.name, (None, None))
            for sc, ok in ((cs, ok_c), (rs, ok_r)):
                if sc is not None:
                    keep = sc == 0
                    if ok is not None:
                        keep &= ~ok
                    sc.masked_fill_(keep & _nonzero_groups(e, sc is cs), 1.0)

    def keep(self, masks: dict) -> None:
        """Factor 1 for the groups ``masks`` (``{block name: (cols, rows)}`` bool masks or ``None``) names."""
        for e, cs, rs in zip(self.entries, self.col_scale, self.row_scale):
            km_c, km_r = masks.get(e.name, (None, None))
            for sc, km in ((cs, km_c), (rs, km_r)):
                if sc is not None and km is not None:
                    sc.masked_fill_(km.to(sc.device), 1.0)

    def dying(self) -> bool:
        """Whether the step would set a non-zero group exactly to zero."""
        return any(bool(((sc == 0) & (nm > 0)).any()) for sc, nm in ((self.col_all, self.col_norms),
                                                                   (self.row_all, self.row_norms))
                   if sc is not None)


def _nonzero_groups(e: _Entry, columns: bool) -> torch.Tensor:
    """Bool mask of the non-zero column (``columns``) or row groups of entry ``e``."""
    beta = e.block.beta_2d()
    if columns:
        return (beta != 0).any(dim=0)
    live = (beta != 0).any(dim=1)
    for p in e.row_params:
        live = live | (p != 0)
    return live


def _prox_scales(entries: list, lr: float) -> _ProxPlan:
    """Shrink factors of the prox of ``entries`` (all on one device/dtype), batched across blocks; nothing is
    written (:func:`_apply_scales` does).

    Cost notes (see benchmarks/bench_prox.py): the work is memory-bound over β, plus ~20 tiny ops per block. So one
    squared copy of each β serves both group norms (column sums now; the row sums *after* the column shrinkage as
    (β∘β)·s², the same quantity in exact arithmetic: no strided ``β.norm(dim=0)``), the shrink factors of all
    blocks are computed in one go on concatenated norms (:func:`_apply_scales` then scales the row parameters with
    one foreach call).
    """
    betas = [e.block.beta_2d() for e in entries]
    n = len(entries)
    sqs: list = [None] * n        # kept only where the row pass needs them (frees memory early otherwise)
    col_sums: list = [None] * n
    for i, (e, b) in enumerate(zip(entries, betas)):
        sq = b * b
        if e.lam_col > 0:
            col_sums[i] = sq.sum(dim=0)
        if e.lam_row > 0:
            sqs[i] = sq
    plan = _ProxPlan(entries)
    col_scale, row_scale = plan.col_scale, plan.row_scale
    cols = [i for i, e in enumerate(entries) if e.lam_col > 0]
    if cols:
        sizes = [betas[i].shape[1] for i in cols]
        norms = torch.cat([col_sums[i] for i in cols]).sqrt_()
        col_all = shrink_factors(norms, _thresholds(lr, [entries[i].lam_col for i in cols], sizes, norms))
        plan.col_all, plan.col_norms = col_all, norms
        for i, sc in zip(cols, col_all.split(sizes)):
            col_scale[i] = sc
    rows = [i for i, e in enumerate(entries) if e.lam_row > 0]
    if rows:
        sizes = [betas[i].shape[0] for i in rows]
        parts = []
        for i in rows:
            rs = sqs[i].sum(dim=1) if col_scale[i] is None else torch.mv(sqs[i], col_scale[i].square())
            if entries[i].row_params:
                rs = rs + torch.stack(entries[i].row_params).square().sum(dim=0)
            parts.append(rs)
        norms = torch.cat(parts).sqrt_()
        row_all = shrink_factors(norms, _thresholds(lr, [entries[i].lam_row for i in rows], sizes, norms))
        plan.row_all, plan.row_norms = row_all, norms
        for i, sc in zip(rows, row_all.split(sizes)):
            row_scale[i] = sc
    return plan


def _apply_scales(plan: _ProxPlan, state) -> None:
    """Write the prox step of ``plan`` (columns, then rows) and zero the momentum of the groups it zeroed."""
    entries, col_scale, row_scale = plan.entries, plan.col_scale, plan.row_scale
    betas = [e.block.beta_2d() for e in entries]
    cols = [i for i, sc in enumerate(col_scale) if sc is not None]
    rows = [i for i, sc in enumerate(row_scale) if sc is not None]
    for i in cols:
        betas[i].mul_(col_scale[i])
    params, scales = [], []
    for i in rows:
        betas[i].mul_(row_scale[i].unsqueeze(1))
        params.extend(entries[i].row_params)
        scales.extend([row_scale[i]] * len(entries[i].row_params))
    if params:
        torch._foreach_mul_(params, scales)
    if state is None:
        return
    # momentum of groups the prox set to zero (on CPU, checked once for all blocks: usually nothing to do)
    col_all, row_all = plan.col_all, plan.row_all
    if cols and not (col_all.device.type == "cpu" and not bool((col_all == 0).any())):
        for i in cols:
            _zero_momentum_groups(state, entries[i].block.coeff.weight, 1, col_scale[i] == 0)
    if rows and not (row_all.device.type == "cpu" and not bool((row_all == 0).any())):
        for i in rows:
            dead = row_scale[i] == 0
            _zero_momentum_groups(state, entries[i].block.coeff.weight, 0, dead)
            for p in entries[i].row_params:
                _zero_momentum_groups(state, p, 0, dead)


def _thresholds(lr: float, lams: list, sizes: list, ref: torch.Tensor):
    """``lr·λ`` per group: a float when every block has the same λ, else a vector matching the concatenation."""
    if all(lam == lams[0] for lam in lams):
        return lr * lams[0]
    per_block = torch.tensor([lr * lam for lam in lams], dtype=ref.dtype, device=ref.device)
    return torch.repeat_interleave(per_block, torch.tensor(sizes, device=ref.device))


def shrink_factors(norms: torch.Tensor, thresh) -> torch.Tensor:
    """``max(0, 1 − thresh/‖g‖)`` with 0 for zero groups; same dtype/device as ``norms``."""
    return torch.where(norms > thresh, 1 - thresh / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                       torch.zeros_like(norms))


def zero_momentum(state, param: torch.Tensor, dead_mask: torch.Tensor) -> None:
    """Zero the momentum (SGD ``momentum_buffer``, Adam ``exp_avg``) of ``param`` in optimizer ``state`` where
    ``dead_mask`` (broadcastable to the parameter) is True."""
    st = state.get(param)
    if not st:
        return
    for key in ("momentum_buffer", "exp_avg"):
        buf = st.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.masked_fill_(dead_mask.expand_as(buf), 0)


def _zero_momentum_groups(state, param: torch.Tensor, dim: int, dead: torch.Tensor) -> None:
    """Zero the optimizer buffers of ``param`` at the dead indices of dimension ``dim`` (``dead``: bool vector).

    On CPU only the dead slices are written (usually none: checking is free there); elsewhere a sync-free
    full-buffer ``masked_fill_`` as in :func:`zero_momentum`."""
    st = state.get(param)
    if not st:
        return
    if dead.device.type == "cpu":
        if not bool(dead.any()):
            return
        idx = torch.nonzero(dead).flatten()
        for key in ("momentum_buffer", "exp_avg"):
            buf = st.get(key)
            if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
                buf.index_fill_(dim, idx, 0)
        return
    shape = [1] * param.dim()
    shape[dim] = -1
    zero_momentum(state, param, dead.view(shape))


def zero_optimizer_state(state, param: torch.Tensor, dim: int, dead: torch.Tensor) -> None:
    """Zero every buffer of :data:`OPTIMIZER_STATE_KEYS` of ``param`` in optimizer ``state`` at the indices of
    dimension ``dim`` where ``dead`` (bool vector) is True."""
    st = state.get(param)
    if not st or not bool(dead.any()):
        return
    idx = torch.nonzero(dead).flatten()
    for key in OPTIMIZER_STATE_KEYS:
        buf = st.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.index_fill_(dim, idx, 0)
