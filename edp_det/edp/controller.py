"""Target-driven regularisation: λ adapted during the regularised phase so that the groups trained to *exactly
zero* remove the requested FLOPs cut R by Epoch_ES, and nothing more.

The user gives R (``flops_target``) and the phase length T (``epoch_es`` × iterations per epoch); the controller
sets, after every optimizer step of the phase, the proximal threshold of every group (see
:mod:`edp_det.edp.regularizer`) as

    τ(g) = λ · a_kind · w(layer, kind) · s(layer, kind)

* ``s``: the size of the optimizer's own recent update of one group of that layer and kind: an exponential moving
  average of the RMS over the layer's groups of ‖Δg‖, where Δ is what the optimizer step (weight decay included)
  just did to β (and, for row groups, to the bias and norm affine parameters). Under SGD this is lr·‖gradient‖,
  under Adam about lr·√n; so λ is dimensionless — "shrink each group by λ of its own typical step" — and means
  the same under both optimizers and at every learning rate. One scale per layer and kind, not per group, so that
  within a layer the groups are still ranked by their norm (a per-group scale would penalise most the groups the
  loss pushes hardest).
* ``w``: the cost weight (``group_weight``): the FLOPs one group of that layer saves when removed
  (:meth:`edp_det.edp.budget.Structure.group_costs`), times the layer's measured time per FLOP for ``latency``,
  or 1 for ``uniform`` (the paper's penalty); normalised to a group-count-weighted mean of 1. A group with more
  cost per norm reaches zero earlier.
* ``a_kind``: λ1 : λ2 of the config as a ratio (the larger one is 1).

How λ is chosen (every ``interval`` ≈ T/50 steps, and every step near the deadline): the zero-group cut c
follows the reference c*(t) = R·min(1, t/(ρT)), a straight line to R at the deadline ρT (ρ = 0.8). The live
groups are put in *removal order*: norm relative to the strongest group of the same layer and kind (the PM
budget's order, :class:`~edp_det.edp.budget.RelativeNorm`), divided by ``a·w``. The order does not involve ``s``:
under SGD ``s`` follows the gradient, which is largest in the early layers, and ranking by it would thin them first.
The shortest prefix of that order whose removal adds to c what is missing for the reference H steps ahead,
c*(t + H) (R itself once the deadline is within H), is the *selected* set; q = ‖g‖ / (a·w·s) is a group's number of
steps to zero at λ = 1, and q* the largest q in the set. Under pure shrinkage a group dies after q/λ steps, so

    λ = q* / min(H, ρT − t)        (H = T/5, one quarter of the deadline; from ρT − 1 on: q*, which zeroes the
                                    selected groups now; 0 while c is already at or above c*(t + H))

makes every selected group reach zero when the reference gets there: each group fades over
up to H steps (the network adapts while it fades) and the cut grows along the line, not in a burst at the start
(a single horizon to the deadline zeroes the many weak groups of a trained network at once).

Only the groups of that prefix are shrunk; the proximal step leaves every other group as it is. Soft-thresholding
every group, as the paper's fixed penalty does, takes about the last removed group's norm off every surviving group
within the ramp: over a long schedule the loss restores them, over the few hundred steps of a compression
schedule it does not, and the network reaches PM far below its starting accuracy. The prefix is chosen
again at every update from the current norms, so a group the loss strengthens leaves it, and the groups in it only
get weaker: the order stays the training's.

Why this is stable: λ is recomputed from the current state (the weights' scores, the cut and the steps left),
not integrated from an error, so there is no wind-up and no oscillation: a group the loss pushes back raises q*
and λ at the next update, a cut ahead of the reference sets λ to 0 until the line catches up. The deadline term
grows without bound as t → ρT (at ρT it is q* itself, which zeroes the selected groups in one step), so the
target is reached by ρT whatever the optimizer, learning rate or starting point, with ≥ (1 − ρ)·T steps to
spare. Overshoot is prevented per step: when a proximal step would take the cut to R or beyond, only the weakest
of the groups it would zero (lowest norm/threshold) up to R are zeroed and the others are left as they are, so
the cut lands in [R, R + one group's saving]. No avalanche can occur because no group outside the selected set is
shrunk at all.

The strongest live group of each layer and kind (largest norm, the PM budget's rule: see
:meth:`edp_det.edp.budget.Structure.candidates`) is never zeroed nor shrunk: it is never selected and the proximal
step leaves it unchanged. So no layer is emptied by training (an emptied or near-empty
layer gives the following BatchNorm a near-zero signal to normalise, which makes training diverge).

A group the prox sets to zero stays zero for the rest of the phase: after every optimizer step it is set to zero
again, its optimizer state (SGD momentum, Adam first and second moments) included, so that neither the gradient,
stale moments nor weight decay revive it. This makes the zero-group cut monotone (the controller measures what
it acts on) and lets PM remove only exact zeros. Once the cut reaches R the controller freezes: no proximal step
on live groups any more, while the rest of the network trains on.
"""
from __future__ import annotations

import logging
import math

import torch

from edp_det.edp.budget import BudgetError, Structure, shortest_prefix
from edp_det.edp.regularizer import EDPRegularizer, zero_optimizer_state
from edp_det.ops.flops import cut_reaches, flops_cut

__all__ = ["TargetController", "group_weights", "GROUP_WEIGHTS"]

logger = logging.getLogger(__name__)

#: how a group's penalty is weighted: FLOPs it saves, measured time it saves, or the paper's uniform penalty
GROUP_WEIGHTS = ("flops", "latency", "uniform")


def group_weights(structure: Structure, mode: str = "flops", layer_weights: dict | None = None,
                  kinds=("col", "row")) -> dict[str, tuple[float, float | None]]:
    """Penalty weight of one group of each layer and kind: ``{layer name: (column weight, row weight or None)}``.

    ``flops``: the FLOPs the group saves (:meth:`Structure.group_costs`); ``latency``: that times
    ``layer_weights[layer]`` (relative time per FLOP, :func:`edp_det.deploy.latency.measure_time_per_flop`;
    required); ``uniform``: 1. Normalised so that the mean over all groups of ``kinds`` is 1."""
    if mode not in GROUP_WEIGHTS:
        raise ValueError(f"group_weight must be one of {GROUP_WEIGHTS}, got {mode!r}")
    if mode == "latency" and not layer_weights:
        raise ValueError("group_weight=latency needs the layers' time per FLOP (layer_weights)")
    for name, v in (layer_weights or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"layer weight of {name!r} must be a positive finite number, got {v!r}")
    costs = structure.group_costs()
    raw, total, count = {}, 0.0, 0
    for l in structure.layers:
        col, row = costs[l.name]
        if mode == "uniform":
            col, row = 1.0, (None if row is None else 1.0)
        elif mode == "latency":
            t = float(layer_weights.get(l.name, 1.0))
            col, row = col * t, (None if row is None else row * t)
        raw[l.name] = (col, row)
        if "col" in kinds:
            total, count = total + col * l.block.rank, count + l.block.rank
        if "row" in kinds and row is not None:
            total, count = total + row * l.block.out_channels, count + l.block.out_channels
    if not count or not total > 0 or not math.isfinite(total):
        raise ValueError(f"group_weight={mode}: the groups have no cost to weigh (FLOPs counted at a size where "
                         f"the regularised layers do not run?)")
    mean = total / count
    return {n: (c / mean, None if r is None else r / mean) for n, (c, r) in raw.items()}


class TargetController:
    """Drives an :class:`EDPRegularizer` so that its exact-zero groups reach ``target`` (see the module docstring).

    Args:
        reg: the regulariser (its ``lam_col``/``lam_row`` per block are set by :meth:`step`).
        structure: :class:`Structure` of the same model with FLOPs (``input_size`` given).
        target: R in (0, 1).
        total_steps: T, optimizer steps of the regularised phase (≥ 1).
        weights: ``{layer: (column weight, row weight)}`` from :func:`group_weights` (default: ``flops``).
        optimizer: whose state of held groups is zeroed (default: the regulariser's).
        kinds: the group kinds that may be regularised (``"col"``, ``"row"``).
    Raises :class:`~edp_det.edp.budget.BudgetError` when zeroing every regularised group cannot reach R.
    """

    RAMP = 0.8            # ρ: the deadline as a fraction of T
    UPDATES = 50          # λ updates over the phase
    EMA = 0.9             # of the optimizer step size
    HORIZON = 0.25        # H as a fraction of the deadline ρT: how far ahead the reference is aimed at

    def __init__(self, reg: EDPRegularizer, structure: Structure, target: float, total_steps: int,
                 weights: dict | None = None, optimizer=None, kinds=("col", "row")):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < float(target) < 1:
            raise ValueError(f"flops_target must be a number in (0, 1), got {target!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"the regularised phase must have ≥ 1 step, got {total_steps!r}")
        if structure.original_flops is None:
            raise ValueError("target-driven regularisation needs FLOPs: build the Structure with input_size")
        self.reg, self.struct = reg, structure
        self.target, self.total = float(target), total_steps
        self.kinds = tuple(kinds)
        self.optimizer = optimizer if optimizer is not None else reg.optimizer
        self.weights = weights if weights is not None else group_weights(structure, "flops", kinds=self.kinds)
        for name, (wc, wr) in self.weights.items():
            for v in (wc, wr):
                if v is not None and (not math.isfinite(v) or v < 0):
                    raise ValueError(f"group weight of {name!r} must be a finite number ≥ 0, got {v!r}")
        self.interval = max(1, round(total_steps / self.UPDATES))
        self.deadline = self.RAMP * total_steps
        self.scale: dict[str, list] = {}          # layer -> [column step size, row step size]
        self._snap = None
        self.lam: float | None = None
        self.selected: dict | None = None     # {layer: (cols, rows)}: the groups the prox may shrink
        self.t = 0
        self.frozen_step: int | None = None
        self.held: dict | None = None
        self.record: dict = {}
        self._capped = False
        self._ratio = (1.0, 1.0)
        self._check_reachable()

    # ------------------------------------------------------------------ structure
    def _layers(self):
        """(layer masks, regulariser entry) pairs of the regularised blocks."""
        by_name = {e.name: e for e in self.reg.entries}
        return [(l, by_name[l.name]) for l in self.struct.layers if l.name in by_name]

    def _cut(self) -> float:
        return flops_cut(self.struct.original_flops, self.struct.flops_after())

    def _reaches(self) -> bool:
        return cut_reaches(self.struct.original_flops, self.struct.flops_after(), self.target)

    def _check_reachable(self) -> None:
        zero = {}
        for l, e in self._layers():
            b = l.block
            cols = torch.ones(b.rank, dtype=torch.bool, device=b.coeff.weight.device) if "col" in self.kinds else None
            rows = torch.ones(b.out_channels, dtype=torch.bool, device=b.coeff.weight.device) \
                if "row" in self.kinds and b.channel_prunable else None
            for m in (cols, rows):    # one group of each layer and kind is kept (the strongest, whichever it is)
                if m is not None:
                    m[0] = False
            zero[l.name] = (cols, rows)
        self.struct.refresh(zero=zero)
        ok, best = self._reaches(), self._cut()
        self.struct.refresh()
        if not ok:
            raise BudgetError(f"flops_target={self.target:.4f} cannot be reached by regularisation: zeroing every "
                              f"regularised group but the strongest of each layer and kind cuts only {best:.4f} of the scope's FLOPs")

    # ------------------------------------------------------------------ optimizer step size
    @torch.no_grad()
    def _snapshot(self) -> None:
        self._snap = {e.name: (e.block.beta_2d().clone(), [p.clone() for p in e.row_params])
                      for e in self.reg.entries}

    @torch.no_grad()
    def _measure(self) -> None:
        if self._snap is None:
            return
        for e in self.reg.entries:
            old = self._snap.get(e.name)
            beta = e.block.beta_2d()
            if old is None or old[0].shape != beta.shape:
                continue
            d2 = float((beta - old[0]).double().square().sum())
            col = math.sqrt(d2 / beta.shape[1])
            rsq = d2 + sum(float((p - q).double().square().sum()) for p, q in zip(e.row_params, old[1]))
            row = math.sqrt(rsq / beta.shape[0])
            prev = self.scale.get(e.name)
            self.scale[e.name] = [col, row] if prev is None else \
                [self.EMA * prev[0] + (1 - self.EMA) * col, self.EMA * prev[1] + (1 - self.EMA) * row]

    # ------------------------------------------------------------------ scores
    def _unit(self, name: str) -> tuple[float, float]:
        """Threshold per unit λ of one column and one row group of layer ``name``."""
        s = self.scale.get(name, [0.0, 0.0])
        wc, wr = self.weights.get(name, (1.0, None))
        uc = self._ratio[0] * wc * s[0] if "col" in self.kinds else 0.0
        ur = self._ratio[1] * (wr or 0.0) * s[1] if "row" in self.kinds else 0.0
        return uc, ur

    @staticmethod
    @torch.no_grad()
    def _norms(l, e) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Column group norms and row group norms (β rows with the bias / norm affine entries; None where the
        layer's channels are not prunable) of layer ``l`` with regulariser entry ``e``, float64."""
        beta = e.block.beta_2d().double()
        rows = None
        if l.prunable:
            sq = beta.square().sum(dim=1)
            for p in e.row_params:
                sq = sq + p.double().square()
            rows = sq.sqrt()
        return beta.norm(dim=0), rows

    @staticmethod
    def _strongest_of(norms: torch.Tensor | None) -> torch.Tensor | None:
        """Bool mask of the largest of the non-zero ``norms`` (all False when every group is zero)."""
        if norms is None:
            return None
        m = torch.zeros(norms.shape, dtype=torch.bool, device=norms.device)
        if bool((norms > 0).any()):
            m[int(torch.argmax(norms))] = True
        return m

    @torch.no_grad()
    def _candidates(self, only: dict | None = None, by_threshold: bool = False, relative: bool = False):
        """Live groups (the strongest of each layer and kind excluded) as (layer name, kind, index, score)
        tensors, score = norm / unit threshold (steps to zero at λ = 1), sorted by ascending score.
        ``only``: restrict to these ``{name: (cols, rows)}`` masks; ``by_threshold``: score = norm / the entry's
        current threshold; ``relative``: sorted instead by the removal order (:meth:`_update`): norm relative to
        the strongest group of the same layer and kind, divided by the group's cost weight."""
        names, kinds, idxs, scores, keys = [], [], [], [], []
        for l, e in self._layers():
            col_n, row_n = self._norms(l, e)
            uc, ur = (e.lam_col, e.lam_row) if by_threshold else self._unit(l.name)
            wc, wr = self.weights.get(l.name, (1.0, None))
            sel_c, sel_r = (only or {}).get(l.name, (None, None)) if only is not None else (True, True)
            for kind, n, u, w, sel, ok in ((0, col_n, uc, wc * self._ratio[0], sel_c, True),
                                           (1, row_n, ur, (wr or 0.0) * self._ratio[1], sel_r, l.prunable)):
                if not (u > 0 and ok and sel is not None):
                    continue
                m = (n > 0) & ~self._strongest_of(n)
                if sel is not True:
                    m &= sel
                i = torch.nonzero(m).flatten()
                names += [l.name] * len(i)
                kinds += [kind] * len(i)
                idxs.append(i.cpu())
                scores.append((n[i] / u).cpu())
                if relative:
                    keys.append((n[i] / (n.max() * w)).cpu())
        if not names:
            return [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
        kinds_t, idx_t, score_t = torch.tensor(kinds), torch.cat(idxs), torch.cat(scores)
        order = torch.sort(torch.cat(keys) if relative else score_t, stable=True).indices
        return [names[i] for i in order.tolist()], kinds_t[order], idx_t[order], score_t[order]

    def _zero_for(self, names, kinds, idxs, k: int) -> dict:
        """``{layer: (cols, rows)}`` masks of the first ``k`` candidates."""
        zero = {}
        for l, _ in self._layers():
            b = l.block
            dev = b.coeff.weight.device
            zero[l.name] = (torch.zeros(b.rank, dtype=torch.bool, device=dev),
                            torch.zeros(b.out_channels, dtype=torch.bool, device=dev))
        for name, kind, i in zip(names[:k], kinds[:k].tolist(), idxs[:k].tolist()):
            zero[name][kind][i] = True
        return zero

    def _prefix_reaching(self, names, kinds, idxs) -> int | None:
        """Smallest k such that zeroing the first k candidates (with the groups already zero) reaches R; None if
        not even all of them do."""
        def reaches(k):
            self.struct.refresh(zero=self._zero_for(names, kinds, idxs, k))
            return self._reaches()
        n = len(names)
        try:
            if not reaches(n):
                return None
            return shortest_prefix(n, reaches)
        finally:
            self.struct.refresh()

    # ------------------------------------------------------------------ control
    def _update(self) -> None:
        self.struct.refresh()
        cut = self._cut()
        ref = self.target * min(1.0, self.t / self.deadline)
        self.record = {"reg_step": self.t, "zero_cut": cut, "zero_cut_ref": ref,
                       "live_rank": sum(int(l.col_live.sum()) for l in self.struct.layers),
                       "live_channels": sum(int(l.row_live.sum()) for l in self.struct.layers)}
        if self._reaches():
            self._freeze()
            return
        names, kinds, idxs, scores = self._candidates(relative=True)
        if not len(names):
            return
        # the selected set: where the FLOPs the live groups save, summed in removal order, cover what is missing
        # (an estimate: it ignores the dead-channel propagation and the merged form; the step guard is exact)
        costs = self.struct.marginal_costs()
        saved = torch.tensor([costs[n][k] or 0.0 for n, k in zip(names, kinds.tolist())],
                             dtype=torch.float64).cumsum(0)
        left = self.deadline - self.t
        horizon = max(float(self.interval), self.HORIZON * self.deadline)
        goal = self.target if left <= horizon else self.target * min(1.0, (self.t + horizon) / self.deadline)
        if goal <= cut:               # ahead of the reference: no shrinkage until it catches up
            self.lam, self.selected = 0.0, None
            self.record.update(reg_lambda_rank=0.0, reg_lambda_channel=0.0)
            return
        need = (goal - cut) * self.struct.original_flops
        k = min(int(torch.searchsorted(saved, torch.tensor([need], dtype=torch.float64))), len(names) - 1)
        q = float(scores[:k + 1].max())       # the selected group slowest to zero sets the pace
        # only the groups of that prefix are shrunk: the others train on unbiased (group soft-thresholding of every
        # group would take the last removed group's norm off every survivor within the ramp)
        self.selected = self._zero_for(names, kinds, idxs, k + 1)
        # receding horizon: the groups of the cut the reference reaches H steps from now die by then (from the
        # last horizon before the deadline on: by the deadline); at the deadline the selected groups must die at this step
        self.lam = q / min(horizon, left) if left > 1 else q * (1 + 1e-6)
        self.record.update(reg_lambda_rank=self.lam * self._ratio[0] if "col" in self.kinds else 0.0,
                           reg_lambda_channel=self.lam * self._ratio[1] if "row" in self.kinds else 0.0)

    def _cap(self, zero: dict):
        """Guard of a proximal step: below R apply it; reaching R, zero only the weakest groups up to R."""
        self.struct.refresh(zero=zero)
        reached = self._reaches()
        self.struct.refresh()
        if not reached:
            return True
        dying = {}
        for l, e in self._layers():
            cols, rows = zero.get(l.name, (None, None))
            dying[l.name] = (cols, rows)
        names, kinds, idxs, _ = self._candidates(only=dying, by_threshold=True)
        k = self._prefix_reaching(names, kinds, idxs)
        self._capped = True
        return self._zero_for(names, kinds, idxs, len(names) if k is None else k)

    @torch.no_grad()
    def _zero_masks(self) -> dict:
        held = {}
        for e in self.reg.entries:
            beta = e.block.beta_2d()
            cols = (beta == 0).all(dim=0)
            rows = (beta == 0).all(dim=1)
            for p in e.row_params:
                rows &= p == 0
            held[e.name] = (cols, rows if e.block.channel_prunable else torch.zeros_like(rows))
        return held

    @torch.no_grad()
    def _freeze(self) -> None:
        self.frozen_step = self.t if self.frozen_step is None else self.frozen_step
        self.held = self._zero_masks()
        self.struct.refresh()
        self.record.update(zero_cut=self._cut(), frozen_step=self.frozen_step)
        logger.info("EDP: the groups trained to zero cut %.2f %% of the FLOPs (target %.2f %%) at regularised step "
                    "%d of %d; λ frozen, zero groups held at zero", 100 * self._cut(), 100 * self.target,
                    self.t, self.total)

    @torch.no_grad()
    def hold(self) -> None:
        """Set the held groups and their optimizer state to zero again."""
        state = self.optimizer.state if self.optimizer is not None else {}
        for e in self.reg.entries:
            cols, rows = self.held.get(e.name, (None, None))
            if cols is None or cols.shape[0] != e.block.rank or rows.shape[0] != e.block.out_channels:
                continue
            w = e.block.coeff.weight
            beta = e.block.beta_2d()
            if bool(cols.any()):
                beta[:, cols] = 0
                zero_optimizer_state(state, w, 1, cols)
            if bool(rows.any()):
                beta[rows, :] = 0
                zero_optimizer_state(state, w, 0, rows)
                for p in e.row_params:
                    p[rows] = 0
                    zero_optimizer_state(state, p, 0, rows)

    def _kept(self) -> dict:
        """Groups the proximal step leaves unchanged: every group but those selected at the last update (the
        strongest group of each layer and kind is never selected, :meth:`_candidates`)."""
        return {name: (~cols, ~rows) for name, (cols, rows) in self.selected.items()}

    def step(self, lambda_rank: float = 1.0, lambda_channel: float = 1.0) -> None:
        """After an optimizer step of the regularised phase. ``lambda_rank``/``lambda_channel``: the configured
        λ1/λ2, used as a ratio (a kind with 0 is not regularised at this step)."""
        top = max(lambda_rank, lambda_channel)
        self._ratio = (lambda_rank / top, lambda_channel / top) if top > 0 else (0.0, 0.0)
        self.t += 1
        self._measure()
        if self.held is not None:     # groups the prox zeroed stay zero: the optimizer step must not revive them
            self.hold()
        if self.frozen_step is not None:
            if self.held is None:
                self._freeze()
                self.hold()
            self._snapshot()
            return
        if not self.scale:            # the first step only measures where the optimizer moves the groups
            self._snapshot()
            return
        # (a selection is missing after a resume or a compaction: choose it again now)
        if self.lam is None or (self.lam and self.selected is None) or self.t % self.interval == 0 \
                or self.t >= self.deadline - self.interval:
            self._update()
            if self.frozen_step is not None:
                self._snapshot()
                return
        if self.lam and self.selected is not None:     # λ = 0: the cut is ahead of the line, nothing to shrink
            for l, e in self._layers():
                uc, ur = self._unit(l.name)
                e.lam_col = self.lam * uc
                e.lam_row = self.lam * ur if e.block.channel_prunable else 0.0
            self._capped = False
            self.reg.prox_step(1.0, guard=self._cap, keep=self._kept())
            self.held = self._zero_masks()
            if self._capped:
                self.struct.refresh()
                self._freeze()
        self._snapshot()

    def reset_structure(self, structure: Structure) -> None:
        """The blocks were compacted: use the new ``structure``; held masks are taken again from the zeros."""
        self.struct = structure
        self._snap = None
        self.selected = None
        if self.frozen_step is not None:
            self._freeze()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"lam": self.lam, "t": self.t, "frozen_step": self.frozen_step}

    def load_state_dict(self, state: dict) -> None:
        self.lam = state.get("lam")
        self.t = int(state.get("t", 0))
        fs = state.get("frozen_step")
        self.frozen_step = None if fs is None else int(fs)
        self.held = None
