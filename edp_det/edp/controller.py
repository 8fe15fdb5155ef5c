"""Target-driven regularisation: the groups trained to *exactly zero* remove the requested FLOPs cut R by
Epoch_ES, and nothing more, whatever the optimizer, learning rate or starting point.

The user gives R (``flops_target``) and the phase length T (``epoch_es`` × iterations per epoch). The controller
decides *which* groups go and *when*; the training decides nothing else away from them:

* **Which.** The live groups are put in *removal order*: norm relative to the strongest group of the same layer and
  kind (:class:`~edp_det.edp.budget.RelativeNorm`, the PM budget's order without layer weights), divided by
  ``a_kind · w``. ``w`` is the
  cost weight (``group_weight``): the FLOPs one group of that layer saves when removed
  (:meth:`edp_det.edp.budget.Structure.group_costs`), times the layer's measured time per FLOP for ``latency``, or
  1 for ``uniform`` (the paper's penalty), normalised to a group-count-weighted mean of 1: a group with more cost
  per norm goes earlier. ``a_kind`` is λ1 : λ2 of the config as a ratio (the larger one is 1; a kind with 0 is
  not regularised). With ``rank_layers="tied"`` (the PM budget's option) the rank groups of channel-prunable
  layers are not candidates: those layers lose channels only.
* **When.** The zero-group cut c follows the reference c*(t) = R·min(1, t/(ρT)), a straight line to R at the
  deadline ρT (ρ = 1/4). At every update (every ``interval`` ≈ T/50 steps, and every step near the deadline) the
  shortest prefix of the removal order (groups already fading excluded) whose saving covers what the reference
  H steps ahead, c*(t + H) (R itself once the deadline is within H), still misses after the fading groups die is
  added to the *fading* set (found to within an eighth of its length, from the previous update's length: a few
  evaluations of the structure instead of a bisection over all groups), each group with a death step
  d = t + min(H, ρT − t) − 1.
* **How.** After every optimizer step a fading group g is multiplied by (d − t)/(d − t + 1): a linear fade of its
  current norm that reaches exactly zero at step d (group soft-thresholding with the threshold
  τ(g) = ‖g‖/(d − t + 1)). The recorded λ of a kind is the mean of that per-step fraction over its fading groups.

Why the fade is paced by the group itself and not by λ times the optimizer's step: a threshold proportional to the
optimizer's update size means different things under SGD (lr·‖gradient‖: largest in the high-resolution early
layers) and Adam (about lr·√n per group), and a group whose pace is set by it dies after a number of steps that
depends on the optimizer, not on the schedule. Fading every selected group over the same number of steps, from its
own current norm, gives the same trajectory under every optimizer and learning rate: the network adapts to each
removal over H steps (H = ρT/4, a quarter of the deadline) and the cut grows along the line, not in bursts. A group
the loss pushes back is faded from its new norm at the next step (its threshold grows with it), so it still dies
at d.

Why the deadline is early: once the target is reached nothing more is regularised, and the network PM will keep is
the one that trains. The EDP method runs PM at the end of the epoch in which that happened
(:attr:`edp_det.methods.edp.EDPMethod.prune_epoch`), so the rest of the schedule trains the pruned network — plain
convolutions where PM merged, smaller and cheaper per step — instead of the full decomposed one with its zero groups
held: training a network as two factors per convolution under Adam moves it by larger steps than training its plain
convolutions, and compressing trained detectors the accuracy lost to that was not recovered after PM
(docs/RESULTS.md, "Target-driven EDP"). A late deadline leaves the final structure less of the schedule. From
scratch, an early deadline chooses the structure from the norms of a less-trained network.

Only the fading groups are shrunk; the others train unbiased. Soft-thresholding every group, as the paper's fixed
penalty does, takes about the last removed group's norm off every surviving group within the ramp: over a long
schedule the loss restores them, over the few hundred steps of a compression schedule it does not.

Why this is stable: nothing is integrated from an error, so there is no wind-up: the set grows only by what the
reference needs beyond what is already fading, the death steps are bounded by the deadline, and at ρT − 1 every
group still missing is added with d = t (zeroed now), so the target is reached by ρT with ≥ (1 − ρ)·T steps of
training left before PM. Overshoot is prevented per step: when a step would take the cut to R or beyond, only the
first of the dying groups in removal order up to R are zeroed and the others are left as they are, so the cut
lands in [R, R + one group's saving]. No avalanche can occur because no group outside the fading set is shrunk.

The strongest group of each layer and kind among those not fading (largest norm, the PM budget's rule: see
:meth:`edp_det.edp.budget.Structure.candidates`) is never selected: no layer is emptied by training (an emptied
or near-empty layer gives the following BatchNorm a near-zero signal to normalise, which makes training diverge).

A group that reaches zero stays zero for the rest of the phase: after every optimizer step it is set to zero
again, its optimizer state (SGD momentum, Adam first and second moments) included, so that neither the gradient,
stale moments nor weight decay revive it. This makes the zero-group cut monotone (the controller measures what it
acts on) and lets PM remove only exact zeros. Once the cut reaches R the controller freezes: no group is faded any
more, while the rest of the network trains on.
"""
from __future__ import annotations

import logging
import math

import torch

from edp_det.edp.budget import BudgetError, Structure, check_rank_layers, rank_removable, shortest_prefix
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


class _Order:
    """Candidate groups in removal order, kept per layer and kind (``segments``: ``(layer name, kind, indices)``
    with one key per index; sorted by key, stable) so that the masks of a prefix are built with a few tensor
    operations per layer instead of one per group."""

    def __init__(self, layers, segments: list, keys: list):
        self.layers = [(l.name, l.block.rank, l.block.out_channels, l.block.coeff.weight.device) for l, _ in layers]
        self.segments = segments
        n = sum(int(i.numel()) for _, _, i in segments)
        self.n = n
        self.pos = []                  # per segment: the position of each of its groups in the removal order
        if n:
            order = torch.sort(torch.cat(keys), stable=True).indices
            inv = torch.empty_like(order)
            inv[order] = torch.arange(n)
            self.pos = list(inv.split([int(i.numel()) for _, _, i in segments]))

    def __len__(self) -> int:
        return self.n

    def prefix(self, k: int, base: dict | None = None) -> dict:
        """``{layer: (cols, rows)}`` masks of the first ``k`` candidates (or-ed with ``base``'s masks)."""
        zero = {}
        for name, rank, out, dev in self.layers:
            cols, rows = (base or {}).get(name, (None, None))
            zero[name] = (torch.zeros(rank, dtype=torch.bool, device=dev) if cols is None else cols.clone(),
                          torch.zeros(out, dtype=torch.bool, device=dev) if rows is None else rows.clone())
        for (name, kind, i), pos in zip(self.segments, self.pos):
            chosen = i[(pos < k).to(i.device)]
            if chosen.numel():
                zero[name][kind][chosen] = True
        return zero

    def first(self, k: int):
        """(layer name, kind, index tensor) of the first ``k`` candidates, per layer and kind."""
        for (name, kind, i), pos in zip(self.segments, self.pos):
            chosen = i[(pos < k).to(i.device)]
            if chosen.numel():
                yield name, kind, chosen


class TargetController:
    """Drives the groups of an :class:`EDPRegularizer` so that its exact-zero groups reach ``target`` (see the
    module docstring).

    Args:
        reg: the regulariser whose blocks are faded (its :meth:`~EDPRegularizer.scale_groups`).
        structure: :class:`Structure` of the same model with FLOPs (``input_size`` given).
        target: R in (0, 1).
        total_steps: T, optimizer steps of the regularised phase (≥ 1).
        weights: ``{layer: (column weight, row weight)}`` from :func:`group_weights` (default: ``flops``).
        optimizer: whose state of held groups is zeroed (default: the regulariser's).
        kinds: the group kinds that may be regularised (``"col"``, ``"row"``).
        rank_layers: ``"all"``, or ``"tied"``: rank groups only in layers whose channels are not prunable (the
            PM budget's ``rank_layers``; channel-prunable layers lose channels only and stay one dense conv).
    Raises :class:`~edp_det.edp.budget.BudgetError` when zeroing every regularised group cannot reach R.
    """

    RAMP = 0.25           # ρ: the deadline as a fraction of T
    UPDATES = 50          # selection updates over the phase
    HORIZON = 0.25        # H as a fraction of the deadline ρT: how long one group fades
    SLACK = 0.125         # an update may add up to this fraction more groups than the smallest covering prefix

    def __init__(self, reg: EDPRegularizer, structure: Structure, target: float, total_steps: int,
                 weights: dict | None = None, optimizer=None, kinds=("col", "row"), rank_layers: str = "all"):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < float(target) < 1:
            raise ValueError(f"flops_target must be a number in (0, 1), got {target!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"the regularised phase must have ≥ 1 step, got {total_steps!r}")
        if structure.original_flops is None:
            raise ValueError("target-driven regularisation needs FLOPs: build the Structure with input_size")
        self.reg, self.struct = reg, structure
        self.target, self.total = float(target), total_steps
        self.kinds = tuple(kinds)
        check_rank_layers(rank_layers)
        #: layers whose rank groups are not regularised (the PM budget's rule, :func:`rank_removable`)
        self._no_rank = {l.name for l in structure.layers if not rank_removable(l, self.kinds, rank_layers)}
        self.optimizer = optimizer if optimizer is not None else reg.optimizer
        self.weights = weights if weights is not None else group_weights(structure, "flops", kinds=self.kinds)
        for name, (wc, wr) in self.weights.items():
            for v in (wc, wr):
                if v is not None and (not math.isfinite(v) or v < 0):
                    raise ValueError(f"group weight of {name!r} must be a finite number ≥ 0, got {v!r}")
        self.interval = max(1, round(total_steps / self.UPDATES))
        self.deadline = self.RAMP * total_steps
        self.horizon = max(float(self.interval), self.HORIZON * self.deadline)
        #: {layer: (column death steps, row death steps)}, float64, +inf where a group is not fading
        self.death: dict | None = None
        self.t = 0
        self.frozen_step: int | None = None
        self.held: dict | None = None
        self.record: dict = {}
        self._capped = False
        self._ratio = (1.0, 1.0)
        self._last_k = 1                 # groups added at the latest update: the next update's first guess
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
            cols = torch.ones(b.rank, dtype=torch.bool, device=b.coeff.weight.device) \
                if "col" in self.kinds and l.name not in self._no_rank else None
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

    def _fresh_death(self) -> dict:
        out = {}
        for l, _ in self._layers():
            dev = l.block.coeff.weight.device
            out[l.name] = (torch.full((l.block.rank,), math.inf, dtype=torch.float64, device=dev),
                           torch.full((l.block.out_channels,), math.inf, dtype=torch.float64, device=dev))
        return out

    def _fading(self, norms: dict) -> dict:
        """``{layer: (cols, rows)}`` bool masks of the live groups that are fading (``norms``: :meth:`_all_norms`)."""
        out = {}
        for l, e in self._layers():
            dc, dr = self.death[l.name]
            col_n, row_n = norms[l.name]
            cols = torch.isfinite(dc) & (col_n > 0)
            rows = torch.isfinite(dr) & (row_n > 0) if row_n is not None else torch.zeros_like(dr, dtype=torch.bool)
            out[l.name] = (cols, rows)
        return out

    # ------------------------------------------------------------------ scores
    def _key_weight(self, name: str) -> tuple[float, float]:
        """``a_kind · w`` of one column and one row group of layer ``name`` (0: that kind is not regularised)."""
        wc, wr = self.weights.get(name, (1.0, None))
        kc = self._ratio[0] * wc if "col" in self.kinds and name not in self._no_rank else 0.0
        kr = self._ratio[1] * (wr or 0.0) if "row" in self.kinds else 0.0
        return kc, kr

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

    def _all_norms(self) -> dict:
        """``{layer: (column norms, row norms or None)}`` of every regularised layer (:meth:`_norms`)."""
        return {l.name: self._norms(l, e) for l, e in self._layers()}

    @torch.no_grad()
    def _candidates(self, norms: dict, only: dict | None = None, exclude: dict | None = None) -> _Order:
        """Live groups in removal order: norm relative to the strongest group of the same layer and kind, divided
        by the group's ``a·w``. The strongest group of each layer and kind among those not in ``exclude`` is never
        a candidate. ``norms``: :meth:`_all_norms`; ``only``: restrict to these ``{name: (cols, rows)}`` masks;
        ``exclude``: leave these out."""
        segments, keys = [], []
        for l, e in self._layers():
            col_n, row_n = norms[l.name]
            kw = self._key_weight(l.name)
            sel = (only or {}).get(l.name, (None, None)) if only is not None else (True, True)
            out = (exclude or {}).get(l.name, (None, None))
            for kind, n, w, ok in ((0, col_n, kw[0], True), (1, row_n, kw[1], l.prunable)):
                if not (w > 0 and ok and sel[kind] is not None):
                    continue
                live = n > 0
                free = live if out[kind] is None else live & ~out[kind]
                if not bool(free.any()):
                    continue
                top = torch.argmax(torch.where(free, n, torch.zeros_like(n)))
                m = live.clone()
                m[top] = False
                if out[kind] is not None:
                    m &= ~out[kind]
                if sel[kind] is not True:
                    m &= sel[kind]
                i = torch.nonzero(m).flatten()
                if i.numel():
                    segments.append((l.name, kind, i))
                    keys.append((n[i] / (n[top] * w)).cpu())
        return _Order(self._layers(), segments, keys)

    def _prefix_reaching(self, order: _Order, masks) -> int | None:
        """Smallest k such that zeroing the first k candidates (with the groups already zero) reaches R; None if
        not even all of them do. ``masks``: the structure's :meth:`~Structure.weight_masks`."""
        def reaches(k):
            self.struct.refresh(zero=order.prefix(k), masks=masks)
            return self._reaches()
        n = len(order)
        try:
            if not reaches(n):
                return None
            return shortest_prefix(n, reaches)
        finally:
            self.struct.refresh(masks=masks)

    def _prefix_covering(self, order: _Order, fading: dict, goal: float, masks) -> int:
        """A k ≥ 1 such that zeroing the first k candidates and the ``fading`` groups cuts ≥ ``goal``, at most
        ``SLACK``·k groups more than the smallest such k (all of them when not even that does; the exact cap at R is
        :meth:`_cap`'s). Searched from the previous update's k (the reference grows by the same amount at every
        update): :func:`shortest_prefix` with a guess and a slack. ``masks``: the structure's
        :meth:`~Structure.weight_masks`."""
        orig = self.struct.original_flops

        def covers(k):
            self.struct.refresh(zero=order.prefix(k, base=fading), masks=masks)
            return cut_reaches(orig, self.struct.flops_after(), goal)
        n = len(order)
        try:
            if not covers(n):
                return n
            self._last_k = max(1, shortest_prefix(n, covers, guess=self._last_k, slack=self.SLACK))
            return self._last_k
        finally:
            self.struct.refresh(masks=masks)

    # ------------------------------------------------------------------ control
    def _update(self) -> None:
        masks = self.struct.weight_masks()     # the weights do not change during an update
        self.struct.refresh(masks=masks)
        cut = self._cut()
        ref = self.target * min(1.0, self.t / self.deadline)
        self.record = {"reg_step": self.t, "zero_cut": cut, "zero_cut_ref": ref,
                       "live_rank": sum(int(l.col_live.sum()) for l in self.struct.layers),
                       "live_channels": sum(int(l.row_live.sum()) for l in self.struct.layers)}
        if self._reaches():
            self._freeze()
            return
        left = self.deadline - self.t
        goal = self.target if left <= self.horizon else self.target * (self.t + self.horizon) / self.deadline
        norms = self._all_norms()
        fading = self._fading(norms)
        # the cut once every fading group is zero (exact: the structure PM would build)
        self.struct.refresh(zero=fading, masks=masks)
        pending = self._cut()
        self.struct.refresh(masks=masks)
        if goal > pending:
            order = self._candidates(norms, exclude=fading)
            if len(order):
                # the groups to add: the shortest prefix of the removal order with which (and the fading groups)
                # the structure PM would build reaches the goal (exact: dead-channel propagation and merged form
                # included; per-group FLOPs would miss both)
                k = self._prefix_covering(order, fading, goal, masks)
                # each new group fades over H steps (to the deadline at the latest; from ρT − 1 on: dies now)
                die = self.t + max(1.0, math.floor(min(self.horizon, left))) - 1
                for name, kind, i in order.first(k):
                    self.death[name][kind][i] = die
                fading = self._fading(norms)
        self._record_rates(fading)

    def _record_rates(self, fading: dict) -> None:
        """λ per kind in the record: the mean fraction of its norm a fading group loses per step."""
        rates = ([], [])
        for name, (cols, rows) in fading.items():
            for kind, m in enumerate((cols, rows)):
                d = self.death[name][kind][m]
                if d.numel():
                    rates[kind].append(1.0 / (d - self.t + 1).clamp_min(1.0))
        lam = [float(torch.cat(r).mean()) if r else 0.0 for r in rates]
        self.record.update(reg_lambda_rank=lam[0], reg_lambda_channel=lam[1],
                           fading_rank=int(sum(x.numel() for x in rates[0])),
                           fading_channels=int(sum(x.numel() for x in rates[1])))

    def _cap(self, zero: dict):
        """Guard of a fading step: below R apply it; reaching R, zero only the first dying groups (removal order)
        up to R."""
        masks = self.struct.weight_masks()
        self.struct.refresh(zero=zero, masks=masks)
        reached = self._reaches()
        self.struct.refresh(masks=masks)
        if not reached:
            return True
        order = self._candidates(self._all_norms(), only=zero)
        k = self._prefix_reaching(order, masks)
        self._capped = True
        return order.prefix(len(order) if k is None else k)

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
        self.record.update(zero_cut=self._cut(), frozen_step=self.frozen_step, reg_lambda_rank=0.0,
                           reg_lambda_channel=0.0)
        logger.info("EDP: the groups trained to zero cut %.2f %% of the FLOPs (target %.2f %%) at regularised step "
                    "%d of %d; zero groups held at zero", 100 * self._cut(), 100 * self.target,
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
            cols, rows = cols.to(w.device), rows.to(w.device)
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

    def _factors(self) -> dict:
        """Per-group multipliers of this step: (d − t)/(d − t + 1) for fading groups, 1 elsewhere."""
        out = {}
        for l, e in self._layers():
            dc, dr = self.death[l.name]
            kw = self._key_weight(l.name)
            parts = []
            for kind, d in enumerate((dc, dr)):
                if kw[kind] <= 0 or (kind == 1 and not e.block.channel_prunable) or not bool(torch.isfinite(d).any()):
                    parts.append(None)
                    continue
                left = (d - self.t).clamp_min(0.0)
                parts.append(torch.where(torch.isfinite(d), left / (left + 1), torch.ones_like(d)))
            if parts[0] is not None or parts[1] is not None:
                out[l.name] = tuple(parts)
        return out

    def step(self, lambda_rank: float = 1.0, lambda_channel: float = 1.0) -> None:
        """After an optimizer step of the regularised phase. ``lambda_rank``/``lambda_channel``: the configured
        λ1/λ2, used as a ratio (a kind with 0 is not regularised at this step)."""
        top = max(lambda_rank, lambda_channel)
        self._ratio = (lambda_rank / top, lambda_channel / top) if top > 0 else (0.0, 0.0)
        self.t += 1
        if self.held is not None:     # groups that reached zero stay zero: the optimizer step must not revive them
            self.hold()
        if self.frozen_step is not None:
            if self.held is None:
                self._freeze()
                self.hold()
            return
        if self.death is None:        # first step, after a compaction, or resumed without death steps: choose again
            self.death = self._fresh_death()
            self._update()
        elif self.t % self.interval == 0 or self.t >= self.deadline - self.interval:
            self._update()
        if self.frozen_step is not None:
            return
        factors = self._factors()
        if factors:
            self._capped = False
            self.reg.scale_groups(factors, guard=self._cap)
            self.held = self._zero_masks()
            if self._capped:
                self.struct.refresh()
                self._freeze()

    def reset_structure(self, structure: Structure) -> None:
        """The blocks were compacted: use the new ``structure``; held masks are taken again from the zeros."""
        self.struct = structure
        self.death = None
        if self.frozen_step is not None:
            self._freeze()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Step, freeze step and the held zero groups (``{layer: [cols, rows]}`` bool masks): a run resumed from a
        checkpoint holds the same groups at zero from its first step, before its first optimizer step revives
        them (their optimizer state is zero, so that step moves them by about the learning rate). Before the
        target is reached also the death step of every group (``{layer: [cols, rows]}`` float64, +inf where not
        fading): a run resumed mid-ramp continues the uninterrupted run's trajectory."""
        out = {"t": self.t, "frozen_step": self.frozen_step}
        if self.held is not None:
            out["held"] = {name: [cols.cpu(), rows.cpu()] for name, (cols, rows) in self.held.items()}
        if self.death is not None and self.frozen_step is None:
            # mid-ramp: the fading groups and their death steps, and the selection's first guess, so that a
            # resumed run fades the same groups on the same steps as the uninterrupted one
            out["death"] = {name: [dc.cpu(), dr.cpu()] for name, (dc, dr) in self.death.items()}
            out["last_k"] = self._last_k
        return out

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state.get("t", 0))
        fs = state.get("frozen_step")
        self.frozen_step = None if fs is None else int(fs)
        held = state.get("held")
        self.held = None if held is None else {name: (cols, rows) for name, (cols, rows) in held.items()}
        self._last_k = int(state.get("last_k", 1))
        death = state.get("death")
        self.death = None
        if death is not None:
            layers = {l.name: l.block for l, _ in self._layers()}
            restored = {}
            for name, block in layers.items():
                dc, dr = death.get(name, (None, None))
                if dc is None or dc.shape != (block.rank,) or dr.shape != (block.out_channels,):
                    return           # another architecture (e.g. compacted since): the selection starts afresh
                dev = block.coeff.weight.device
                restored[name] = (dc.to(device=dev, dtype=torch.float64), dr.to(device=dev, dtype=torch.float64))
            self.death = restored
