"""The FLOPs budget: what a decomposed model would cost after Pruning & Merging, and which groups to remove to
reach a requested FLOPs cut.

A :class:`Structure` holds, for every CompressedAwareConv2d, its live masks:
  * ``in_live``  (c_in,)  input channels still produced (the producer's live rows; all True if tied),
  * ``col_live`` (r,)     β columns with a non-zero β column *and* a non-zero θ' filter on live inputs,
  * ``row_live`` (c_out,) channel-prunable blocks: row groups that are non-zero *and* read by some consumer.
Dead channels propagate both ways to a fixpoint (a channel nobody reads is removable, a channel that is exactly
zero needs no input weights), so a whole dead residual branch collapses.

Cost of a block after PM (eq. 14, which is the same comparison for params and FLOPs since β is 1×1, stride 1):
    flops = 2 · positions · min(c_in'·c_out'·k², r'·(c_in'·k² + c_out'))

Group selection for a FLOPs target (the paper's "preset FLOPs ratio" mode): candidates are the live column groups
of every block and the live row groups of channel-prunable blocks. Groups of different layers are compared by
    score = ‖g‖₂ / max ‖·‖₂ of the same layer and kind  /  the layer's weight (below; by default estimated)
i.e. magnitude relative to the group's own layer, so that without weights every layer is cut in proportion to its
weakness (the paper's per-layer proportion, Table IX); FLOPs enter through the stopping rule (bisection on the real
cost). The score does not favour groups that save many FLOPs: such a preference empties the high-resolution layers
to 1-channel bottlenecks before touching the others (docs/BENCHMARKS.md).
Layer weights make the order cost-aware: ``layer_weights`` = ``{layer: relative time per FLOP}``, and the score is
divided by the layer's weight, so layers slow per FLOP are cut first and the FLOPs cut buys more time.
:meth:`Structure.estimated_time_per_flop` gives them without measuring (the default of
:func:`~edp_det.edp.pruning.prune_and_merge`): a convolution applies each of its weights at ``positions`` output
positions, and one whose weights are reused at few positions (the 7×7 maps of a ResNet's last stage at batch 1) is
bound by reading its weights rather than by arithmetic, on CPUs and GPUs alike, so its time per FLOP is modelled as
``1 + REUSE_POSITIONS / positions``. :func:`edp_det.deploy.latency.measure_time_per_flop` measures them on the
deployment hardware instead. A weighted order would empty a layer whose groups are all alike (an untrained network's
flat norms) down to its strongest group before touching the next; so under the estimated weights a layer loses more
than ``SPREAD`` of its removable groups (those live at PM, per kind) only after every layer has lost that much (the
rest of the order is the same ranking again). Measured weights are taken as they are (their strongest preferences
are where the measured speed comes from; ``max_layer_cut`` caps them). Two more options (docs/BENCHMARKS.md §3):
  * ``rank_layers="tied"``: rank (β column) groups are candidates only in layers whose outputs feed a residual add;
    channel-prunable layers lose output channels only and stay one dense conv after PM (a thin low-rank pair runs
    slower per FLOP than a dense conv on CPUs);
  * ``max_layer_cut`` = f lets the budget remove at most floor(f · live) groups of each layer and kind (a hard
    limit, like Torch-Pruning's / NNCF's per-layer maximum pruning ratio).
The strongest group of each layer and kind is never removed by the budget (a layer is never emptied
by it; a layer trained to zero is still removed). Groups are removed in ascending score; the smallest prefix of
that order reaching the target is found by bisection on the analytic cost, with optional rounding of every
surviving count to a multiple of ``round_to``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edp_det.ops import adapter
from edp_det.ops.block import CompressedAwareConv2d
from edp_det.edp.decompose import iter_blocks
from edp_det.ops.flops import cut_reaches, flops_cut
from edp_det.ops.graph import build_channel_graph, get_submodule, unwrap_model
from edp_det.ops.surgery import kept_indices
from edp_det.runtime.errors import EDPError

__all__ = ["Structure", "LayerMasks", "REUSE_POSITIONS", "SPREAD", "structure_from_model", "scope_prefixes",
           "BudgetError", "Candidates",
           "ScorePolicy", "RelativeNorm", "GivenScores", "shortest_prefix", "rank_removable", "KINDS"]


#: the estimated layer cost (:meth:`Structure.estimated_time_per_flop`): a convolution's time per FLOP is modelled as
#: 1 + REUSE_POSITIONS / (output positions at which each weight is applied)
REUSE_POSITIONS = 64
#: under the estimated layer weights, a layer loses more than this fraction of its removable groups only after
#: every layer has
SPREAD = 0.75

# which layers' rank (β column) groups the budget may remove: "all", or "tied" = only layers whose output channels
# cannot be pruned (residual-tied); channel-prunable layers are then cut by channels only and stay one dense conv
RANK_LAYERS = ("all", "tied")


class BudgetError(EDPError, ValueError):
    """A FLOPs target that cannot be met (unreachable, or not reached by the structure PM built)."""


def check_rank_layers(value) -> None:
    """``rank_layers`` must be one of :data:`RANK_LAYERS`."""
    if value not in RANK_LAYERS:
        raise ValueError(f"rank_layers={value!r} must be one of {RANK_LAYERS}")


def rank_removable(layer, kinds=("col", "row"), rank_layers: str = "all") -> bool:
    """Whether ``layer``'s rank (β column) groups may be removed under ``rank_layers``: always with ``"all"``;
    with ``"tied"`` only where its channels are not prunable (or channel groups are not among ``kinds``)."""
    return "col" in kinds and (rank_layers == "all" or not layer.prunable or "row" not in kinds)


def check_max_layer_cut(value) -> None:
    """``max_layer_cut`` must be None or a number in (0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
        raise ValueError(f"max_layer_cut must be null or a number in (0, 1], got {value!r}")


def check_layer_weights(layer_weights, known_names) -> dict[str, float]:
    """Validate ``{layer name: positive finite weight}``; names must be decomposed layers (``ValueError``)."""
    if not isinstance(layer_weights, dict):
        raise TypeError(f"layer_weights must be a dict of layer name -> weight, got {type(layer_weights).__name__}")
    known = set(known_names)
    unknown = sorted(set(layer_weights) - known)
    if unknown:
        raise ValueError(f"layer_weights names layers that are not decomposed blocks: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    out = {}
    for name, w in layer_weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"layer_weights[{name!r}] must be a positive finite number, got {w!r}")
        out[name] = float(w)
    return out


def scope_prefixes(model: nn.Module) -> list[str]:
    """Module-name prefixes whose FLOPs a ``flops_target`` refers to.

    Classifier: the whole model (``""``). Detector: its ResNet body; plus the FPN and the RPN when those were
    decomposed too (``compress.scope: detector``); see :func:`edp_det.ops.adapter.scope_prefixes`.
    """
    model = unwrap_model(model)
    return adapter.scope_prefixes(model, (n for n, _ in iter_blocks(model)))


@dataclass
class LayerMasks:
    name: str
    block: CompressedAwareConv2d
    norm: nn.Module | None
    kk: int
    positions: int
    prunable: bool
    producer: int | None            # index into Structure.layers
    consumers: list[int]
    in_live: torch.Tensor
    col_live: torch.Tensor
    row_live: torch.Tensor
    calls: int = 1                  # forward calls per image whose positions ``positions`` sums

    def row_params(self) -> list[torch.Tensor]:
        ps = []
        if self.block.coeff.bias is not None:
            ps.append(self.block.coeff.bias)
        if self.norm is not None:
            ps.extend([self.norm.weight, self.norm.bias])
        return ps


def _block_cost(ci, r, co, kk):
    """Per-position multiply-adds after PM: min(merged, two convs). Works on ints and tensors."""
    merged = ci * co * kk
    split = r * (ci * kk + co)
    return torch.minimum(merged, split) if isinstance(merged, torch.Tensor) else min(merged, split)


KINDS = ("col", "row")


@dataclass(frozen=True)
class Candidates:
    """Removable groups in removal order: ``layer`` (index into :attr:`Structure.layers`), ``kind`` (index into
    :data:`KINDS`) and ``index`` (column / channel), three aligned 1-D long tensors."""
    layer: torch.Tensor
    kind: torch.Tensor
    index: torch.Tensor

    @staticmethod
    def empty() -> Candidates:
        e = torch.zeros(0, dtype=torch.long)
        return Candidates(e, e, e)

    def __len__(self) -> int:
        return int(self.layer.numel())


class ScorePolicy:
    """How the FLOPs-target selection ranks a layer's removable groups: :meth:`score` maps the layer's live group
    indices and their norms to scores compared across all layers (lower is removed first)."""

    def score(self, layer: str, kind: str, live_idx: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def strength(self, layer: str, kind: str, norms: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """What decides the one group of a layer and kind that is never removed (its argmax): the norms."""
        return norms


class RelativeNorm(ScorePolicy):
    """A group's norm relative to its layer's strongest group (every layer cut in proportion to its weakness, as
    the paper's per-layer ratio), divided by the layer's weight when ``layer_weights`` are given (a layer that is
    slow per FLOP, weight > 1, is cut first)."""

    def __init__(self, layer_weights: dict | None = None):
        self.layer_weights = layer_weights or {}

    def score(self, layer, kind, live_idx, norms):
        rel = norms / norms.max().clamp_min(1e-300)
        return rel / float(self.layer_weights[layer]) if layer in self.layer_weights else rel


class GivenScores(ScorePolicy):
    """Scores supplied per ``(layer, kind)`` as a tensor indexed by column/channel (the comparison methods' own
    criteria); layers without an entry are scored by ``fallback``."""

    def __init__(self, scores: dict, fallback: ScorePolicy):
        self.scores = scores
        self.fallback = fallback

    def score(self, layer, kind, live_idx, norms):
        given = self.scores.get((layer, kind))
        if given is None:
            return self.fallback.score(layer, kind, live_idx, norms)
        return given.detach().to(device=live_idx.device, dtype=torch.float64)[live_idx]

    def strength(self, layer, kind, norms, scores):
        return scores if (layer, kind) in self.scores else self.fallback.strength(layer, kind, norms, scores)


def shortest_prefix(n: int, reaches, guess: int | None = None, slack: float = 0.0) -> int:
    """The smallest ``k`` in ``[0, n]`` with ``reaches(k)`` for a monotone predicate with ``reaches(n)`` true
    (bisection: O(log n) calls). ``guess``: start from this k, halving or doubling it until the answer is bracketed
    (O(log(answer / guess)) calls when the guess is close); ``slack``: stop once the bracket is at most
    ``slack`` · k wide, returning a k that reaches, at most that much above the smallest."""
    if reaches(0):
        return 0
    lo, hi = 0, n   # reaches(lo) false, reaches(hi) true
    if guess is not None:
        k = min(max(1, guess), n)
        while lo < k < hi:
            if reaches(k):
                hi, k = k, k // 2
            else:
                lo, k = k, 2 * k
    while hi - lo > max(1, int(slack * hi)):
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi


class Structure:
    """Live-mask view of a decomposed model (see module docstring)."""

    def __init__(self, model: nn.Module, layers: list[LayerMasks], other_flops: int | None,
                 original_flops: int | None):
        self.model = model
        self.layers = layers
        self.other_flops = other_flops          # FLOPs in scope that are not in blocks
        self.original_flops = original_flops    # FLOPs of the scope before decomposition
        self.index = {l.name: i for i, l in enumerate(layers)}
        self._deps = None                       # (readers, users) of every layer, see _dependents

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def weight_masks(self) -> tuple[list, list, list]:
        """The non-zero patterns of the current weights that :meth:`refresh` propagates: per layer the non-zero β
        entries (c_out, r), the θ' filters with a non-zero entry per input channel (r, c_in) and the output channels
        with a non-zero bias / norm affine entry (c_out,). Pass them to several :meth:`refresh` calls while the
        weights do not change (they cost one pass over every weight)."""
        beta_nz, theta_nz, own_live = [], [], []
        for l in self.layers:
            b = l.block
            beta_nz.append(b.beta_2d() != 0)                                                        # (c_out, r)
            theta_nz.append((b.basis.weight.reshape(b.rank, b.in_channels, -1) != 0).any(dim=2))    # (r, c_in)
            params_nz = torch.zeros(b.out_channels, dtype=torch.bool, device=b.coeff.weight.device)
            for p in l.row_params():
                params_nz |= p != 0
            own_live.append(params_nz)
        return beta_nz, theta_nz, own_live

    @torch.no_grad()
    def refresh(self, zero: dict | None = None, masks: tuple | None = None) -> None:
        """Recompute live masks from the current weights and propagate dead channels to a fixpoint.

        ``zero``: optional ``{layer name: (cols, rows)}`` of bool masks (or ``None``) of β columns and row groups
        to treat as exactly zero, e.g. what a proximal step would zero, without writing the weights. ``masks``:
        :meth:`weight_masks` of the current weights, computed once for several calls."""
        base_beta, theta_nz, base_own = masks if masks is not None else self.weight_masks()
        beta_nz, own_live = [], []
        for l, bnz, params_nz in zip(self.layers, base_beta, base_own):
            b = l.block
            dev = b.coeff.weight.device
            cols, rows = (zero or {}).get(l.name, (None, None))
            if cols is not None:
                bnz = bnz & ~cols[None, :]
            if rows is not None:
                bnz = bnz & ~rows[:, None]
                params_nz = params_nz & ~rows
            beta_nz.append(bnz)
            own_live.append(params_nz)
            l.in_live = torch.ones(b.in_channels, dtype=torch.bool, device=dev)
            l.row_live = torch.ones(b.out_channels, dtype=torch.bool, device=dev)
            l.col_live = torch.ones(b.rank, dtype=torch.bool, device=dev)
        # greatest fixpoint (every mask only loses entries): a worklist, in layer order, of the layers whose inputs
        # changed — a layer's input channels follow its producer's live rows, its live columns its live rows and
        # inputs, its live rows its live columns and what its consumers' live columns read
        readers, users = self._dependents()
        pending = [True] * len(self.layers)
        while True:
            todo = [i for i, p in enumerate(pending) if p]
            if not todo:
                return
            for i in todo:
                pending[i] = False
                l = self.layers[i]
                if l.producer is not None:
                    l.in_live = self.layers[l.producer].row_live.clone()
                col = ((beta_nz[i] & l.row_live[:, None]).any(dim=0) &
                       (theta_nz[i] & l.in_live[None, :]).any(dim=1))
                if not torch.equal(col, l.col_live):
                    l.col_live = col
                    for j in users[i]:
                        pending[j] = True
                if l.prunable:
                    row = (beta_nz[i] & l.col_live[None, :]).any(dim=1) | own_live[i]
                    if l.consumers:
                        used = torch.zeros_like(row)
                        for ci in l.consumers:
                            used |= (theta_nz[ci] & self.layers[ci].col_live[:, None]).any(dim=0)
                        row &= used
                    if not torch.equal(row, l.row_live):
                        l.row_live = row
                        pending[i] = True
                        for j in readers[i]:
                            pending[j] = True

    def _dependents(self) -> tuple[list, list]:
        """Per layer: the layers whose inputs are its output channels (``readers``) and the layers whose live rows
        depend on its live columns (``users``: those listing it as a consumer)."""
        if self._deps is None:
            readers = [[] for _ in self.layers]
            users = [[] for _ in self.layers]
            for j, l in enumerate(self.layers):
                if l.producer is not None:
                    readers[l.producer].append(j)
                for c in l.consumers:
                    users[c].append(j)
            self._deps = (readers, users)
        return self._deps

    def counts(self) -> torch.Tensor:
        """``[L, 3]`` (c_in, r, c_out) per layer as PM builds them: the live counts, with a dimension that has no
        live entry counted as the one all-zero entry PM keeps (:func:`kept_indices`)."""
        return torch.tensor([[len(kept_indices(m)) for m in (l.in_live, l.col_live, l.row_live)]
                             for l in self.layers], dtype=torch.long)

    # ------------------------------------------------------------------ costs
    def _vectors(self):
        kk = torch.tensor([l.kk for l in self.layers], dtype=torch.long)
        pos = torch.tensor([l.positions for l in self.layers], dtype=torch.long)
        return kk, pos

    def block_flops(self, r: torch.Tensor, co: torch.Tensor, ci: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer FLOPs after PM for live counts ``r``, ``c_out`` (``c_in`` derived from producers)."""
        kk, pos = self._vectors()
        if ci is None:
            ci = self._inputs_from(co)
        return 2 * pos * _block_cost(ci, r, co, kk)

    def _inputs_from(self, co: torch.Tensor) -> torch.Tensor:
        ci = torch.tensor([l.block.in_channels for l in self.layers], dtype=torch.long)
        for i, l in enumerate(self.layers):
            if l.producer is not None:
                ci[i] = co[l.producer]
        return ci

    def flops_after(self, counts: torch.Tensor | None = None) -> int:
        """FLOPs of the scope if PM ran with these live counts (default: current masks)."""
        c = self.counts() if counts is None else counts
        return int(self.block_flops(c[:, 1], c[:, 2], c[:, 0]).sum()) + int(self.other_flops or 0)

    def sparsity(self) -> dict:
        c = self.counts()
        kk, pos = self._vectors()
        orig_params = sum(l.block.orig_in_channels * l.block.orig_out_channels * l.kk for l in self.layers)
        now_params = int(_block_cost(c[:, 0], c[:, 1], c[:, 2], kk).sum())
        out = {"sparse_params": 1 - now_params / orig_params if orig_params else 0.0,
               "sparse_flops": None,
               "live_rank": sum(int(l.col_live.sum()) for l in self.layers),
               "live_channels": sum(int(l.row_live.sum()) for l in self.layers)}
        if bool((pos > 0).all()):
            orig = int(sum(2 * l.positions * l.block.orig_in_channels * l.block.orig_out_channels * l.kk
                           for l in self.layers))
            out["sparse_flops"] = flops_cut(orig, int(self.block_flops(c[:, 1], c[:, 2], c[:, 0]).sum())) \
                if orig else 0.0
        return out

    def group_costs(self) -> dict[str, tuple[float, float | None]]:
        """FLOPs one group of each layer saves when it is removed, at the full (decomposed) widths of the blocks:
        ``{layer name: (per column group, per row group or None)}``.

        A column (rank) group of a block saves its θ' filter and its β column:
        ``2 · positions · (c_in · k² + c_out)``; a row (output-channel) group saves its β row, ``2 · positions ·
        r``, plus the input channel it feeds in every consumer's θ', ``2 · positions_c · r_c · k_c²`` (the
        two-conv form of the cost; see the module docstring for the merged form)."""
        out = {}
        for l in self.layers:
            b = l.block
            col = 2.0 * l.positions * (b.in_channels * l.kk + b.out_channels)
            row = None
            if l.prunable:
                row = 2.0 * l.positions * b.rank
                for ci in l.consumers:
                    c = self.layers[ci]
                    row += 2.0 * c.positions * c.block.rank * c.kk
            out[l.name] = (col, row)
        return out

    def estimated_time_per_flop(self) -> dict[str, float]:
        """Relative time per FLOP of every layer, estimated from its shape: ``1 + REUSE_POSITIONS / positions``
        (``positions``: the output positions at which each weight of the layer is applied in one call — batch 1 with
        ``input_size``, the batch of ``example_inputs`` otherwise, where a larger batch reuses every weight more;
        a layer called several times per image, like the RPN head once per FPN level, reads its weights on every
        call, so its positions are counted per call), normalised so that the mean over the layers weighted by
        their original FLOPs is 1. The PM budget's default layer weights (see the module docstring). A layer the
        counted forward never ran (no positions, no FLOPs to cut) weighs 1."""
        if not any(l.positions for l in self.layers):
            raise BudgetError("spatial sizes unknown: give input_size to estimate the layers' time per FLOP")
        raw = {l.name: 1.0 + REUSE_POSITIONS * l.calls / int(l.positions) if l.positions else 1.0
               for l in self.layers}
        dense = {l.name: float(l.positions * l.block.orig_in_channels * l.block.orig_out_channels * l.kk)
                 for l in self.layers}
        total = sum(dense.values())
        mean = sum(raw[n] * dense[n] for n in raw) / total if total > 0 else 1.0
        return {n: w / mean for n, w in raw.items()}

    def marginal_costs(self) -> dict[str, tuple[float, float | None]]:
        """FLOPs the removal of one more live group of each layer saves now (current live counts, the cost PM
        would build, merged form included: a block still cheaper merged saves nothing per rank group):
        ``{layer name: (per column group, per row group or None)}``."""
        c = self.counts()
        base = self.block_flops(c[:, 1], c[:, 2], c[:, 0])
        total = int(base.sum())
        out = {}
        for i, l in enumerate(self.layers):
            r = c[:, 1].clone()
            r[i] = max(int(r[i]) - 1, 0)
            col = float(base[i] - self.block_flops(r, c[:, 2], c[:, 0])[i])
            row = None
            if l.prunable:
                co = c[:, 2].clone()
                co[i] = max(int(co[i]) - 1, 0)
                ci = c[:, 0].clone()
                for j in l.consumers:
                    ci[j] = co[i]
                row = float(total - int(self.block_flops(c[:, 1], co, ci).sum()))
            out[l.name] = (col, row)
        return out

    # ------------------------------------------------------------------ selection
    @torch.no_grad()
    def group_norms(self, kinds=("col", "row"), rank_layers: str = "all"):
        """The removable groups of every layer: yields ``(layer_index, kind, live_idx, norms)`` with ``kind`` in
        ``"col"`` (β column restricted to live rows) / ``"row"`` (β row over live columns, with bias and norm
        affine) and float64 L2 norms, for every layer and kind that has more than one live group."""
        for i, l in enumerate(self.layers):
            beta = l.block.beta_2d()
            cols = torch.nonzero(l.col_live).flatten()
            if rank_removable(l, kinds, rank_layers) and cols.numel() > 1:
                yield i, "col", cols, beta[l.row_live][:, cols].double().norm(dim=0)
            if "row" in kinds and l.prunable:
                rows = torch.nonzero(l.row_live).flatten()
                if rows.numel() > 1:
                    sq = beta[rows][:, l.col_live].double().pow(2).sum(dim=1)
                    for p in l.row_params():
                        sq = sq + p[rows].double().pow(2)
                    yield i, "row", rows, sq.sqrt()

    @torch.no_grad()
    def candidates(self, policy: ScorePolicy, kinds=("col", "row"), rank_layers: str = "all",
                   max_layer_cut: float | None = None, spread: float | None = None) -> Candidates:
        """Every removable group scored by ``policy`` (lower goes first), the strongest group of each layer and
        kind excluded, at most ``floor(max_layer_cut · live)`` of a layer's weakest groups per kind; sorted. With
        ``spread`` = f, the groups of a layer and kind beyond its ``floor(f · live)`` weakest come after all the
        others (the same order among themselves)."""
        lay, kind, idx, score, tier = [], [], [], [], []
        for i, k, live_idx, norms in self.group_norms(kinds, rank_layers):
            name = self.layers[i].name
            rel = policy.score(name, k, live_idx, norms).cpu()
            sel = torch.ones(len(live_idx), dtype=torch.bool)
            sel[int(torch.argmax(policy.strength(name, k, norms, rel)))] = False
            order = torch.argsort(rel, stable=True)
            if max_layer_cut is not None:
                allowed = min(int(sel.sum()), int(max_layer_cut * len(live_idx)))
                capped = torch.zeros_like(sel)
                capped[order[sel[order]][:allowed]] = True
                sel = capped
            late = torch.zeros(len(live_idx), dtype=torch.long)
            if spread is not None:
                late[order[sel[order]][int(spread * len(live_idx)):]] = 1
            n = int(sel.sum())
            lay.append(torch.full((n,), i, dtype=torch.long))
            kind.append(torch.full((n,), KINDS.index(k), dtype=torch.long))
            idx.append(live_idx.cpu()[sel])
            score.append(rel[sel])
            tier.append(late[sel])
        if not score:
            return Candidates.empty()
        order = torch.sort(torch.cat(score), stable=True).indices
        order = order[torch.sort(torch.cat(tier)[order], stable=True).indices]
        return Candidates(torch.cat(lay)[order], torch.cat(kind)[order], torch.cat(idx)[order])

    def counts_without(self, cands: Candidates, k: int, base: torch.Tensor,
                       round_to: int | None = None) -> torch.Tensor:
        """Live counts (as :meth:`counts`) after removing the first ``k`` candidates from ``base``; with
        ``round_to``, every layer's rank and channel count rounded up to a multiple (never above ``base``)."""
        n_layers = len(self.layers)
        removed = torch.bincount(cands.layer[:k] * 2 + cands.kind[:k], minlength=2 * n_layers).view(n_layers, 2)
        c = base.clone()
        c[:, 1] -= removed[:, 0]
        c[:, 2] -= removed[:, 1]
        if round_to:
            for col in (1, 2):
                live0 = base[:, col]
                up = (c[:, col] + round_to - 1) // round_to * round_to
                down = live0 // round_to * round_to
                c[:, col] = torch.where(up <= live0, up, torch.where(down > 0, down, live0))
        c[:, 0] = self._inputs_from(c[:, 2])
        return c

    @torch.no_grad()
    def select_for_target(self, flops_target: float, round_to: int | None = None, kinds=("col", "row"),
                          group_scores: dict | None = None, rank_layers: str = "all",
                          layer_weights: dict | None = None, max_layer_cut: float | None = None,
                          spread: float | None = None):
        """Choose groups to remove so that the scope's FLOPs cut vs the original is ≥ ``flops_target``.

        ``kinds``: which groups are candidates (``"col"``: rank, ``"row"``: output channels).
        ``group_scores``: optional ``{(layer_name, "col"|"row"): tensor}`` of importance scores indexed by
        column/channel, replacing the default score for that layer and kind (the comparison methods' own
        criteria: L1 of filters, |γ|, singular-value energy); lower is removed first, scores are compared
        across layers as given, and the highest-scored group of each layer and kind is kept. Otherwise the
        score is :class:`RelativeNorm` (``layer_weights`` divide it). ``spread`` = f (``SPREAD`` with the
        estimated weights): a layer loses more than f of its groups only after every layer has (:meth:`candidates`).

        The candidates are ordered by score (:meth:`candidates`) and the shortest prefix that reaches the target
        is found by bisection (:func:`shortest_prefix`) on the analytic cost of the structure PM would build.

        Returns ``(removals, achieved)`` where removals is a list of ``(layer_index, "col"|"row", channel)``;
        ``achieved`` is the analytic cut after removing them (before dead-channel propagation, which can only
        add to it), ``flops_cut`` of integer FLOPs; the comparison with the target is exact (rational), so
        ``achieved >= flops_target`` on every machine. Raises BudgetError if the target cannot be reached.
        """
        if not set(kinds) <= set(KINDS):
            raise ValueError(f"kinds must be a subset of ('col', 'row'), got {kinds!r}")
        check_rank_layers(rank_layers)
        check_max_layer_cut(max_layer_cut)
        if self.original_flops is None:
            raise BudgetError("spatial sizes unknown: give input_size to compute a FLOPs budget")
        policy = RelativeNorm(layer_weights)
        if group_scores:
            policy = GivenScores(group_scores, fallback=policy)
        base = self.counts()
        cands = self.candidates(policy, kinds, rank_layers, max_layer_cut, spread=spread)
        orig = int(self.original_flops)

        def after(k: int) -> int:
            return self.flops_after(self.counts_without(cands, k, base, round_to))

        n = len(cands)
        if not cut_reaches(orig, after(n), flops_target):
            what = "removing every removable group gives" if n else "no removable groups left; the live structure"
            raise BudgetError(f"flops_target={flops_target:.4f} cannot be reached: {what} cuts "
                              f"{flops_cut(orig, after(n)):.4f}")
        k = shortest_prefix(n, lambda m: cut_reaches(orig, after(m), flops_target))
        final = self.counts_without(cands, k, base, round_to)
        removals = []
        for i in range(len(self.layers)):
            for kind_id, label in enumerate(KINDS):
                n_remove = int(base[i, kind_id + 1] - final[i, kind_id + 1])
                if n_remove > 0:
                    sel = (cands.layer == i) & (cands.kind == kind_id)
                    removals.extend((i, label, ch) for ch in cands.index[sel][:n_remove].tolist())
        return removals, flops_cut(orig, after(k))

    @torch.no_grad()
    def zero_groups(self, removals) -> None:
        """Set the chosen groups exactly to zero (β column; or β row + bias + norm affine)."""
        for i, kind, ch in removals:
            l = self.layers[i]
            beta = l.block.beta_2d()
            if kind == "col":
                beta[:, ch] = 0
            else:
                beta[ch, :] = 0
                for p in l.row_params():
                    p[ch] = 0


def structure_from_model(model: nn.Module, input_size=None, example_inputs=None, need_positions: bool = True,
                         flops_report=None) -> Structure:
    """Build the :class:`Structure` of a decomposed model; FLOPs fields need ``input_size``/``example_inputs``."""
    from edp_det.ops.flops import count_flops

    root = unwrap_model(model)
    blocks = list(iter_blocks(root))
    if not blocks:
        raise ValueError("model was never decomposed (no CompressedAwareConv2d): call edp_det.edp.decompose first")
    scope = adapter.scope_of(root, [n for n, _ in blocks])
    try:
        graph = build_channel_graph(root, scope=scope)
        nodes = graph.nodes
    except TypeError:
        nodes = {}
    report = flops_report
    if report is None and need_positions:
        report = count_flops(root, input_size=input_size or (3, 224, 224), example_inputs=example_inputs)
    layers: list[LayerMasks] = []
    index = {n: i for i, (n, _) in enumerate(blocks)}
    for name, b in blocks:
        node = nodes.get(name)
        norm = get_submodule(root, b.norm_name) if b.norm_name else None
        pos, calls = 0, 1
        if report is not None:
            try:
                m = report.module(name)
                pos, calls = m.positions, m.calls
            except KeyError:
                pos = 0
        prod = None
        if node is not None and node.producer in index and blocks[index[node.producer]][1].channel_prunable:
            prod = index[node.producer]
        cons = [index[c] for c in (node.consumers if node is not None else []) if c in index] \
            if b.channel_prunable else []
        kh, kw = b.kernel_size
        layers.append(LayerMasks(name, b, norm, kh * kw, pos, b.channel_prunable, prod, cons,
                                 torch.ones(0, dtype=torch.bool), torch.ones(0, dtype=torch.bool),
                                 torch.ones(0, dtype=torch.bool), calls=int(calls)))
    other = original = None
    if report is not None:
        prefixes = scope_prefixes(root)
        in_scope = [m for m in report.modules if adapter.in_scope(m.name, prefixes)]
        other = sum(m.flops for m in in_scope if m.kind != "edp_block")
        original = sum(m.orig_flops if m.orig_flops is not None else m.flops for m in in_scope)
    s = Structure(root, layers, other, original)
    s.refresh()
    return s

