"""Pruning & Merging (PM, §III-C): remove zero groups exactly, then merge θ'∘β into one conv where eq. (14) says
the merged conv costs no more.

After PM the model holds only ordinary modules: ``nn.Conv2d`` where merged, else a
:class:`~edp_det.ops.surgery.LowRankConv2d` (``basis`` Conv2d k×k, ``coeff`` Conv2d 1×1); norm layers are
sliced to the surviving channels; the consumers of a pruned channel lose the matching input channels (for the
stem: both ``layer1.0.conv1`` and ``layer1.0.downsample.0``). Nothing masked, no zeros kept.

Exactness: a removed column has a zero β column (or a θ' filter that is zero on live inputs); a removed row group
is exactly zero (β row, bias, norm γ and β all zero — the output channel is exactly 0 in train and eval mode) or is
read by no consumer. So for a model whose removed groups are exactly zero, outputs before and after PM agree up to
the rounding of the merged product (computed in float64).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from edp_det.edp.budget import (SPREAD, BudgetError, Structure, check_layer_weights, check_max_layer_cut,
                                check_rank_layers, structure_from_model)
from edp_det.ops import adapter
from edp_det.ops.flops import count_flops, cut_reaches, flops_cut
from edp_det.ops.graph import set_submodule, unwrap_model
from edp_det.ops.surgery import LowRankConv2d, kept_indices, merged_conv, select, slice_conv, slice_norm, \
    slice_param_state

logger = logging.getLogger(__name__)

__all__ = ["prune_and_merge", "PMReport", "LayerChange", "transfer_optimizer_state", "apply_structure",
           "carry_optimizer", "stale_parameters"]


@dataclass
class LayerChange:
    name: str
    kernel: tuple[int, int]
    before: tuple[int, int, int]    # (c_in, r, c_out) of the decomposed block
    after: tuple[int, int, int]     # live (c_in, r, c_out); r is meaningless (= full) when merged
    merged: bool
    flops_before: int
    flops_after: int


@dataclass
class PMReport:
    """What PM did. FLOPs are per image at ``input_size`` and refer to the compression scope
    (classifier: whole model; detector: the ResNet body [+ FPN + RPN head with scope=detector])."""

    layers: list[LayerChange] = field(default_factory=list)
    params_before: int = 0             # whole model, decomposed, before PM
    params_after: int = 0
    params_original: int = 0           # whole model as if undecomposed (convs in scope at original shape)
    flops_original: int = 0            # scope, undecomposed network
    flops_before: int = 0              # scope, decomposed network before PM
    flops_after: int = 0               # scope, after PM (recounted on the real pruned model)
    requested_r_flops: float | None = None
    achieved_r_flops: float = 0.0      # (flops_original − flops_after) / flops_original
    r_flops_from_zero_groups: float = 0.0   # cut the trained-to-zero groups alone gave
    budget_removed_groups: int = 0
    budget: str = "norm"               # "norm", "norm/estimated time" or "norm/measured time" (layer_weights)
    input_size: tuple[int, ...] = ()
    param_map: dict = field(default_factory=dict)   # new param name -> (old name, [index per dim or None])
    old_param_names: dict = field(default_factory=dict, repr=False)   # id(param before PM) -> its name then

    def to_dict(self) -> dict:
        """JSON-ready form (``pm_report.json``): per-layer kernel, ``before``/``after`` (c_in, rank, c_out),
        merged, FLOPs, and the totals and cuts."""
        return {
            "layers": [{"name": l.name, "kernel": list(l.kernel), "before": list(l.before), "after": list(l.after),
                        "merged": l.merged, "flops_before": l.flops_before, "flops_after": l.flops_after}
                       for l in self.layers],
            "params_before": self.params_before, "params_after": self.params_after,
            "params_original": self.params_original,
            "flops_original": self.flops_original, "flops_before": self.flops_before, "flops_after": self.flops_after,
            "requested_r_flops": self.requested_r_flops, "achieved_r_flops": self.achieved_r_flops,
            "r_flops_from_zero_groups": self.r_flops_from_zero_groups,
            "budget_removed_groups": self.budget_removed_groups, "budget": self.budget,
            "input_size": list(self.input_size),
        }

    def format_table(self) -> str:
        """One line per layer (c_in / rank / c_out before -> after, merged, MFLOPs) and a summary line
        (``layers.txt``)."""
        lines = [f"{'layer':<44} {'k':>3} {'c_in':>10} {'rank':>10} {'c_out':>11} {'merged':>6} {'MFLOPs':>16}"]
        for l in self.layers:
            lines.append(f"{l.name:<44} {l.kernel[0]:>3} {l.before[0]:>4}->{l.after[0]:<4} "
                         f"{l.before[1]:>4}->{l.after[1] if not l.merged else '-':<4} "
                         f"{l.before[2]:>4}->{l.after[2]:<5} {'yes' if l.merged else 'no':>6} "
                         f"{l.flops_before / 1e6:>7.1f}->{l.flops_after / 1e6:<7.1f}")
        req = "-" if self.requested_r_flops is None else f"{self.requested_r_flops:.1%}"
        lines.append(f"params {self.params_original / 1e6:.3f} M (original) -> {self.params_after / 1e6:.3f} M; "
                     f"FLOPs {self.flops_original / 1e9:.3f} G -> {self.flops_after / 1e9:.3f} G; "
                     f"R_FLOPs requested {req}, achieved {self.achieved_r_flops:.1%} "
                     f"(zero groups alone: {self.r_flops_from_zero_groups:.1%})")
        return "\n".join(lines)


def prune_and_merge(model: nn.Module, flops_target: float | None = None, input_size=(3, 224, 224),
                    example_inputs=None, round_to: int | None = None, merge: str = "eq14",
                    rank_layers: str = "all", layer_weights: dict | str | None = "estimate",
                    max_layer_cut: float | None = None) -> PMReport:
    """Prune zero groups of every CompressedAwareConv2d and merge where cheaper; in place. Returns a PMReport.

    Args:
        model: a decomposed model (after training with :class:`EDPRegularizer`); DDP-wrapped is fine, but the
            DDP wrapper must be rebuilt afterwards (the parameters change), as must the optimizer
            (:func:`carry_optimizer` rebuilds it with its state carried over).
        flops_target: None, or R in (0, 1): the fraction of the scope's FLOPs *of the original, undecomposed
            network* to remove. If the zero groups already remove ≥ R, nothing more is removed; otherwise the
            smallest remaining groups are zeroed first (see :mod:`edp_det.edp.budget` for how groups of different
            layers are compared) so that the cut is ≥ R and within about one percentage point of it. The cut is
            guaranteed exactly (integer FLOPs of the built model, rational comparison, so
            ``report.achieved_r_flops >= R`` on every machine); a built model that misses it raises
            :class:`~edp_det.edp.budget.BudgetError` (a ``ValueError``) naming both numbers.
        input_size: ``(C, H, W)`` at which FLOPs and the budget are computed (detectors: network input size).
        round_to: keep every surviving rank and channel count a multiple of this (e.g. 8).
        merge: ``"eq14"`` (merge where the merged conv has no more params than the two convs) or ``"never"``.
        rank_layers: which layers' rank groups the FLOPs-target selection may remove: ``"all"`` (default, the
            paper) or ``"tied"`` — only layers whose outputs are tied to a residual add; channel-prunable layers
            are then cut by output channels only and stay one dense convolution after PM (eq. 14 merges them),
            which runs faster per FLOP on CPUs than a thin low-rank pair (docs/BENCHMARKS.md, section 3).
            Groups that training already zeroed are removed either way.
        layer_weights: how the FLOPs-target selection weighs layers against each other: it divides every group's
            score by its layer's relative time per FLOP, so layers slow per FLOP are cut first and the FLOPs cut
            buys more speed. ``"estimate"`` (default): estimated from each layer's shape
            (:meth:`~edp_det.edp.budget.Structure.estimated_time_per_flop`); a dict ``{block name: weight}``:
            measured on the deployment hardware (:func:`edp_det.deploy.latency.measure_time_per_flop`; layers not
            named weigh 1); ``None``: no weights, every layer cut in proportion to its weakness (the paper's
            per-layer ratio). Under the estimated weights no layer loses more than three quarters of its groups
            (:data:`~edp_det.edp.budget.SPREAD`) before every layer has.
        max_layer_cut: optional f in (0, 1]: the FLOPs-target selection removes at most floor(f · live groups) of
            each layer's rank groups and of its channel groups (zero groups are removed regardless); a target
            that cannot be reached under the cap raises ``ValueError``.
    """
    root = unwrap_model(model)
    if flops_target is not None:
        if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float)) or \
                not 0 < float(flops_target) < 1:
            raise ValueError(f"flops_target must be a number in (0, 1), got {flops_target!r}")
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    if merge not in ("eq14", "never"):
        raise ValueError(f"merge must be 'eq14' or 'never', got {merge!r}")
    check_rank_layers(rank_layers)
    check_max_layer_cut(max_layer_cut)
    report_before = count_flops(root, input_size=input_size, example_inputs=example_inputs)
    struct = structure_from_model(root, flops_report=report_before)
    weights_kind, spread = None, None
    if isinstance(layer_weights, str):
        if layer_weights != "estimate":
            raise ValueError(f"layer_weights must be 'estimate', a dict of layer name -> weight or None, "
                             f"got {layer_weights!r}")
        layer_weights = struct.estimated_time_per_flop() if flops_target is not None else None
        weights_kind, spread = "estimated time", SPREAD
    elif layer_weights is not None:
        layer_weights = check_layer_weights(layer_weights, struct.index)
        weights_kind = "measured time"
    report = PMReport(requested_r_flops=None if flops_target is None else float(flops_target),
                      input_size=tuple(report_before.input_size))
    report.params_before = report_before.params
    report.flops_original = int(struct.original_flops)
    report.flops_before = int(sum(m.flops for m in report_before.modules if m.kind == "edp_block")
                              + struct.other_flops)
    report.r_flops_from_zero_groups = flops_cut(struct.original_flops, struct.flops_after())
    if flops_target is not None or round_to:
        target = float(flops_target) if flops_target is not None else 0.0
        try:
            removals, _ = struct.select_for_target(target, round_to=round_to, rank_layers=rank_layers,
                                                   layer_weights=layer_weights, max_layer_cut=max_layer_cut,
                                                   spread=spread)
        except BudgetError as e:
            raise ValueError(str(e)) from None
        struct.zero_groups(removals)
        struct.refresh()
        report.budget_removed_groups = len(removals)
        report.budget = "norm/" + weights_kind if layer_weights else "norm"
    orig_params_delta = 0
    for l in struct.layers:
        b = l.block
        orig_params_delta += b.orig_in_channels * b.orig_out_channels * l.kk + (
            b.coeff.bias.numel() if b.coeff.bias is not None else 0) - sum(p.numel() for p in b.parameters())
    report.params_original = report.params_before + orig_params_delta
    params_before_pm = dict(root.named_parameters())
    apply_structure(root, struct, report, merge)
    _mark_replaced(report, params_before_pm, root)
    after = count_flops(root, input_size=input_size, example_inputs=example_inputs)
    prefixes = adapter.scope_prefixes(root, [l.name for l in struct.layers])
    report.params_after = after.params
    report.flops_after = sum(m.flops for m in after.modules if adapter.in_scope(m.name, prefixes))
    report.achieved_r_flops = flops_cut(report.flops_original, report.flops_after)
    for lc in report.layers:
        try:
            lc.flops_after = after.module(lc.name).flops
        except KeyError:  # unmerged: two convs
            lc.flops_after = sum(after.module(f"{lc.name}.{c}").flops for c in ("basis", "coeff"))
    logger.info("PM: R_FLOPs achieved %.4f (requested %s), params %d (decomposed; original %d) -> %d",
                report.achieved_r_flops, flops_target, report.params_before, report.params_original,
                report.params_after)
    if flops_target is not None and not cut_reaches(report.flops_original, report.flops_after, flops_target):
        raise BudgetError(f"PM missed flops_target={float(flops_target)!r}: the pruned model cuts "
                          f"{report.achieved_r_flops!r} ({report.flops_after} of {report.flops_original} FLOPs; "
                          f"the FLOPs budget predicted {struct.flops_after()})")
    return report


@torch.no_grad()
def apply_structure(root: nn.Module, struct: Structure, report: PMReport, merge: str = "eq14") -> None:
    """PM's surgery: replace every block of ``struct`` by its live part (dead rank columns, row groups and the
    consumers' matching input channels removed, norm layers sliced), merged into one conv where ``merge="eq14"``
    says it costs no more; in place. Appends a :class:`LayerChange` per block and fills ``report.param_map``."""
    rows = [kept_indices(l.row_live) for l in struct.layers]
    for i, l in enumerate(struct.layers):
        b = l.block
        before = (b.in_channels, b.rank, b.out_channels)
        in_idx = rows[l.producer] if l.producer is not None else torch.arange(b.in_channels, device=rows[i].device)
        col_idx, row_idx = kept_indices(l.col_live), rows[i]
        ci, r, co = len(in_idx), len(col_idx), len(row_idx)
        kh, kw = b.kernel_size
        do_merge = merge == "eq14" and ci * co * kh * kw <= r * (ci * kh * kw + co)
        grad = b.coeff.weight.requires_grad
        if do_merge:
            bias = b.coeff.bias[row_idx] if b.coeff.bias is not None else None
            new = merged_conv(select(b.basis.weight, col_idx, in_idx), select(b.coeff.weight, row_idx, col_idx),
                              bias, b.basis, grad)
        else:
            new = LowRankConv2d(slice_conv(b.basis, col_idx, in_idx, grad),
                                slice_conv(b.coeff, row_idx, col_idx, grad))
            report.param_map[f"{l.name}.basis.weight"] = (f"{l.name}.basis.weight", [col_idx, in_idx])
            report.param_map[f"{l.name}.coeff.weight"] = (f"{l.name}.coeff.weight", [row_idx, col_idx])
            if b.coeff.bias is not None:
                report.param_map[f"{l.name}.coeff.bias"] = (f"{l.name}.coeff.bias", [row_idx])
        set_submodule(root, l.name, new)
        if l.norm is not None and b.norm_name is not None:
            keep = torch.zeros(b.out_channels, dtype=torch.bool, device=row_idx.device)
            keep[row_idx] = True
            set_submodule(root, b.norm_name, slice_norm(l.norm, keep))
            if l.norm.affine:
                for p in ("weight", "bias"):
                    report.param_map[f"{b.norm_name}.{p}"] = (f"{b.norm_name}.{p}", [row_idx])
        flops_before = 2 * l.positions * before[1] * (before[0] * l.kk + before[2])
        report.layers.append(LayerChange(l.name, (kh, kw), before, (ci, r, co), do_merge, flops_before, 0))


def transfer_optimizer_state(old_state: dict, old_names: dict, new_model: nn.Module, new_optimizer, report: PMReport
                             ) -> int:
    """Carry per-parameter optimizer state (e.g. SGD momentum) across PM for surviving entries.

    Args:
        old_state: ``old_optimizer.state`` (param tensor -> state dict), captured before PM.
        old_names: ``{name: param}`` of the model before PM.
        new_model / new_optimizer: after PM, the optimizer rebuilt over ``new_model.parameters()``.
        report: the PMReport (its ``param_map`` says how sliced parameters map to old ones).
    Merged convolutions start with fresh state. Returns the number of parameters whose state was carried.
    """
    carried = 0
    for name, p in unwrap_model(new_model).named_parameters():
        if name in report.param_map:
            old_name, idx = report.param_map[name]
        elif name in old_names and old_names[name].shape == p.shape:
            old_name, idx = name, None
        else:
            continue
        old_p = old_names.get(old_name)
        st = old_state.get(old_p) if old_p is not None else None
        if not st:
            continue
        new_st = slice_param_state(st, old_p.shape, idx)
        if all(not isinstance(v, torch.Tensor) or v.shape == p.shape or v.dim() == 0 for v in new_st.values()):
            new_optimizer.state[p] = new_st
            carried += 1
    return carried


# ------------------------------------------------------------------------------ optimizers across PM
_REPLACED_ATTR = "_edp_replaced_by_pm"   # set on every parameter PM took out of the model
_checked_optimizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_hook_handle = None
_pm_calls = 0   # optimizers checked before the latest PM are checked again


def _mark_replaced(report: PMReport, before: dict, root: nn.Module) -> None:
    """Record the pre-PM names (by id) in ``report`` and mark the parameters PM replaced, so that an optimizer
    still holding them warns at its next step (:func:`stale_parameters`)."""
    global _hook_handle, _pm_calls
    _pm_calls += 1
    alive = {id(p) for p in root.parameters()}
    report.old_param_names = {id(p): n for n, p in before.items()}
    for p in before.values():
        if id(p) not in alive:
            setattr(p, _REPLACED_ATTR, True)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_warn_if_stale)


def stale_parameters(optimizer: torch.optim.Optimizer) -> int:
    """How many of ``optimizer``'s parameters :func:`prune_and_merge` has replaced (0: the optimizer fits)."""
    return sum(1 for g in optimizer.param_groups for p in g["params"] if getattr(p, _REPLACED_ATTR, False))


def _warn_if_stale(optimizer, args, kwargs) -> None:
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    if _checked_optimizers.get(optimizer) == (n, _pm_calls):   # checked once per optimizer, its groups and PM
        return
    _checked_optimizers[optimizer] = (n, _pm_calls)
    stale = stale_parameters(optimizer)
    if stale:
        logger.warning("a %s created before prune_and_merge is stepping: %d of its %d parameters were replaced by "
                       "PM and are no longer in the model, so it updates only the %d that survived unchanged; "
                       "use new_opt = edp_det.carry_optimizer(optimizer, model, report)", type(optimizer).__name__,
                       stale, n, n - stale)


def carry_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, report: PMReport) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class and hyper-parameters over the pruned ``model``, with the
    per-parameter state (momentum, Adam moments, ...) of the surviving entries carried over
    (:func:`transfer_optimizer_state`). ``optimizer`` is the one built before :func:`prune_and_merge`, ``report``
    what PM returned. Each new parameter joins the group of the parameter it came from (a merged convolution: the
    group of its block, with fresh state); parameters the old optimizer did not train stay out. A learning-rate
    scheduler must be rebuilt on the new optimizer.
    """
    import inspect

    root = unwrap_model(model)
    old_names = {report.old_param_names[id(p)]: p for g in optimizer.param_groups for p in g["params"]
                 if id(p) in report.old_param_names}
    if not old_names:
        raise ValueError("carry_optimizer: none of the optimizer's parameters belongs to the model that "
                         "prune_and_merge changed (pass the optimizer built before PM and PM's report)")
    group_of = {report.old_param_names[id(p)]: i for i, g in enumerate(optimizer.param_groups)
                for p in g["params"] if id(p) in report.old_param_names}
    members: list[list] = [[] for _ in optimizer.param_groups]
    existed = set(report.old_param_names.values())
    for name, p in root.named_parameters():
        old = report.param_map[name][0] if name in report.param_map else name
        if old not in existed:   # a merged conv: the group of its block's parameters
            old = next((o for o in group_of if o.startswith(name.rsplit(".", 1)[0] + ".")), None)
        if old is not None and old in group_of:
            members[group_of[old]].append(p)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
              for g, ps in zip(optimizer.param_groups, members) if ps]
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    new_opt = type(optimizer)(groups, **defaults)
    carried = transfer_optimizer_state(optimizer.state, old_names, root, new_opt, report)
    logger.info("carry_optimizer: %d parameters in %d groups, state carried for %d", sum(map(len, members)),
                len(groups), carried)
    return new_opt
