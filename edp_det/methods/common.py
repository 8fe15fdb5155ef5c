"""Shared machinery of the comparison methods: the prune-point schedule and the FLOPs-target surgery helpers.

* :class:`PrunePointMethod` — train (with the method's regulariser, if any) for ``compress.epoch_es`` epochs,
  compress once to ``compress.flops_target``, fine-tune for the remaining epochs (the engine keeps the learning
  rate schedule running across the prune point, as for EDP).
* :func:`channel_prune_to_target` — exact output-channel removal driven by a per-channel score (L1 of filters,
  |γ| ...), built on the EDP machinery: the trained network is decomposed function-preservingly
  (:func:`edp_det.edp.decompose`), the budget (:meth:`edp_det.edp.budget.Structure.select_for_target` with the method's
  scores, output channels only) picks the channels to drop, and PM (:func:`edp_det.prune_and_merge`) removes them
  and merges every block back into one plain convolution. FLOPs are recounted on the real pruned model.
* :func:`rank_truncate_to_target` — the same for rank (truncated SVD), columns only.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from edp_det.edp.budget import BudgetError, structure_from_model
from edp_det.edp.decompose import decompose, iter_blocks
from edp_det.ops.graph import build_channel_graph, get_submodule, unwrap_model
from edp_det.edp.pruning import prune_and_merge
from edp_det.methods.base import CompressionMethod, PruneResult

logger = logging.getLogger(__name__)

__all__ = ["PrunePointMethod", "channel_prune_to_target", "rank_truncate_to_target", "refactor_blocks_svd",
           "pm_result"]


class PrunePointMethod(CompressionMethod):
    """Base of the comparison methods: one structural change after ``epoch_es`` epochs, then fine-tuning.

    ``regularized``: whether the method regularises during ``[0, epoch_es)`` (logged per epoch).
    Method-specific options extend :attr:`Options` (see each method's options class); ``flops_target`` must be set.
    """

    regularized = False

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        o = self.options
        self.check_schedule(total_epochs)
        self.epoch_es = o.epoch_es
        if o.flops_target is None:
            raise ValueError(f"method={self.name!r} needs compress.flops_target in (0, 1), got None")
        self.flops_target = o.flops_target
        self.round_to = o.round_to
        self.pruned = False

    @property
    def prune_epoch(self):
        return None if self.pruned else self.epoch_es

    def regularizing(self, epoch: int) -> bool:
        return self.regularized and not self.pruned and epoch < self.epoch_es

    def state_dict(self) -> dict:
        return {"pruned": self.pruned}

    def load_state_dict(self, state: dict) -> None:
        self.pruned = bool(state.get("pruned", False))


# ------------------------------------------------------------------------------------------------ helpers
def pm_result(report, method: str, **extra) -> PruneResult:
    """PMReport → the :class:`PruneResult` of a method whose PM rebuilds every layer it touches (no optimizer
    state is carried)."""
    out = report.to_dict()
    out["method"] = method
    out.update(extra)
    return PruneResult(report=out, table=report.format_table())


def _relu_constant(root: nn.Module, layer) -> torch.Tensor:
    """Per output channel of a decomposed prunable block: its post-ReLU value once its filter is zero (eval)."""
    b = layer.block
    norm = layer.norm
    dev, dt = b.coeff.weight.device, b.coeff.weight.dtype
    if isinstance(norm, nn.BatchNorm2d):
        v = norm.bias.detach().clone() if norm.affine else torch.zeros(norm.num_features, device=dev, dtype=dt)
        if norm.track_running_stats:   # BN(0) in eval mode
            g = norm.weight.detach() if norm.affine else torch.ones_like(v)
            v = v - g * norm.running_mean / torch.sqrt(norm.running_var + norm.eps)
    elif b.coeff.bias is not None:     # folded FrozenBatchNorm2d: the shift lives in the bias
        v = b.coeff.bias.detach().clone()
    else:
        v = torch.zeros(b.out_channels, device=dev, dtype=dt)
    return v.clamp_min(0)


@torch.no_grad()
def _absorb_removed_channels(root: nn.Module, struct, removals) -> int:
    """A removed channel still sends a constant (post-ReLU value of its norm's shift) to its consumers; add that
    constant's contribution to each consumer's bias (folded BN) or subtract it from its BatchNorm running mean.
    Exact for 1×1 consumers and away from zero-padded borders for k×k ones (eval mode; in train mode batch
    statistics absorb a constant shift anyway). Returns the number of consumers adjusted."""
    graph = build_channel_graph(root, scope="backbone")
    by_layer: dict[int, list[int]] = {}
    for i, kind, ch in removals:
        if kind == "row":
            by_layer.setdefault(i, []).append(ch)
    adjusted = 0
    for i, chans in by_layer.items():
        layer = struct.layers[i]
        node = graph.nodes.get(layer.name)
        if node is None:
            continue
        const = _relu_constant(root, layer)
        idx = torch.tensor(chans, dtype=torch.long, device=const.device)
        c = torch.zeros_like(const)
        c[idx] = const[idx]
        if not bool((c != 0).any()):
            continue
        for cname in node.consumers:
            cons = get_submodule(root, cname)
            w = cons.effective_weight().detach()                  # (c_out, c_in, kh, kw)
            delta = (w.sum(dim=(2, 3)) * c.to(w.dtype)[None, :]).sum(dim=1)
            cnode = graph.nodes.get(cname)
            norm = get_submodule(root, cnode.norm) if cnode is not None and cnode.norm else None
            if isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                norm.running_mean.sub_(delta.to(norm.running_mean.dtype))
            elif cons.coeff.bias is not None:
                cons.coeff.bias.add_(delta.to(cons.coeff.bias.dtype))
            else:
                logger.debug("%s: no bias or norm statistics to absorb removed channels of %s", cname, layer.name)
                continue
            adjusted += 1
    return adjusted


def channel_prune_to_target(model: nn.Module, scores: dict[str, torch.Tensor], flops_target: float, input_size,
                            round_to: int | None = None, absorb_constants: bool = True):
    """Remove the lowest-``scores`` output channels of the channel-prunable convs of ``model`` (undecomposed,
    in place) until the backbone FLOPs cut vs the original is ≥ ``flops_target``; returns the PMReport.

    ``scores``: conv name → per-output-channel importance (compared across layers as given; the best channel
    of every layer is kept). Convs missing from ``scores`` are not pruned. FrozenBatchNorm2d layers after convs
    are folded into the conv (bias) on the way, as EDP's decompose does; BatchNorm2d layers are sliced.
    Exactness: a channel whose output is exactly zero is removed exactly; otherwise its constant post-ReLU value
    is absorbed by the consumers (``absorb_constants``, see :func:`_absorb_removed_channels`).
    """
    root = unwrap_model(model)
    decompose(root, channel_prune="auto", init="svd", scope="backbone", forward_mode="auto")
    struct = structure_from_model(root, input_size=input_size)
    big = 1e300
    group_scores = {}
    for layer in struct.layers:
        if layer.prunable:
            s = scores.get(layer.name)
            s = torch.full((layer.block.out_channels,), big, dtype=torch.float64) if s is None else s.double()
            group_scores[(layer.name, "row")] = s
    try:
        removals, _ = struct.select_for_target(flops_target, round_to=round_to, kinds=("row",),
                                               group_scores=group_scores)
    except BudgetError as e:
        raise ValueError(f"channel pruning: {e}") from None
    if absorb_constants:
        _absorb_removed_channels(root, struct, removals)
    struct.zero_groups(removals)
    report = prune_and_merge(root, flops_target=None, input_size=input_size)
    report.requested_r_flops = float(flops_target)
    report.budget_removed_groups = len(removals)
    return report


@torch.no_grad()
def refactor_blocks_svd(model: nn.Module) -> None:
    """Re-factorise every CompressedAwareConv2d as the balanced SVD of its *effective* kernel (after a folded
    FrozenBatchNorm2d scaled β's rows, β's columns are no longer singular directions of what the block computes)."""
    from edp_det.ops.block import balanced_svd_factors

    for _, b in iter_blocks(model):
        w = b.effective_weight().detach().reshape(b.out_channels, -1)
        beta, theta = balanced_svd_factors(w, b.rank)
        b.coeff.weight.copy_(beta.to(b.coeff.weight.dtype).view_as(b.coeff.weight))
        b.basis.weight.copy_(theta.to(b.basis.weight.dtype).view_as(b.basis.weight))


def singular_values(block) -> torch.Tensor:
    """σ_j of a balanced-SVD block: ‖β[:, j]‖·‖θ'[j]‖ (descending after :func:`refactor_blocks_svd`)."""
    beta = block.beta_2d().detach().double()
    theta = block.basis.weight.detach().reshape(block.rank, -1).double()
    return beta.norm(dim=0) * theta.norm(dim=1)


def rank_truncate_to_target(model: nn.Module, flops_target: float, input_size, scope: str = "backbone",
                            round_to: int | None = None):
    """Truncated SVD of every conv in ``scope`` with ranks chosen globally by energy to reach ``flops_target``.

    Score of singular direction j of a layer: the fraction of the layer's energy that truncating at j loses,
    ``Σ_{k≥j} σ_k² / Σ_k σ_k²`` — removing directions in ascending score is a global per-layer energy threshold.
    Each layer ends as one conv (where the rank left does not pay, eq. 14) or ``LowRankConv2d(basis, coeff)``.
    """
    root = unwrap_model(model)
    decompose(root, channel_prune=False, init="svd", scope=scope, forward_mode="auto")
    refactor_blocks_svd(root)
    struct = structure_from_model(root, input_size=input_size)
    group_scores = {}
    for layer in struct.layers:
        s2 = singular_values(layer.block).pow(2)
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]) / s2.sum().clamp_min(1e-300)
        group_scores[(layer.name, "col")] = tail
    try:
        removals, _ = struct.select_for_target(flops_target, round_to=round_to, kinds=("col",),
                                               group_scores=group_scores)
    except BudgetError as e:
        raise ValueError(f"rank truncation: {e}") from None
    struct.zero_groups(removals)
    report = prune_and_merge(root, flops_target=None, input_size=input_size)
    report.requested_r_flops = float(flops_target)
    report.budget_removed_groups = len(removals)
    return report
