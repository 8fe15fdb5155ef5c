"""Compaction during the regularised phase: physically remove β groups that are *already exactly zero*, without
merging, so that training continues on smaller CompressedAwareConv2d blocks (training gets cheaper as the prox
drives ranks and channels down).

``compact_zero_groups(model)`` applies the pruning half of PM (§III-C) and nothing else:
  * a β column that is zero on the live rows (or whose θ' filter is zero on the live inputs) is removed together
    with the matching θ' filter: the block's rank ``r`` shrinks;
  * a row group of a channel-prunable block that is exactly zero (β row, bias, γ and b of the following
    BatchNorm2d) or that no consumer reads is removed: the block's ``c_out``, the norm layer (affine parameters
    *and* running statistics) and the consumers' θ' input channels shrink.
Dead channels propagate to a fixpoint exactly as in :mod:`edp_det.edp.budget`. Blocks stay CompressedAwareConv2d
(same ``orig_in_channels`` / ``orig_out_channels``, ``channel_prunable``, ``norm_name``, ``forward_mode``), so
:class:`~edp_det.EDPRegularizer`, FLOPs accounting against the original network and a later
:func:`~edp_det.prune_and_merge` all keep working.

Exactness: the model computes the same function before and after (train and eval mode, bit-for-bit up to the
summation order of the smaller convolutions): every removed entry contributed exactly zero. The one difference to
training on without compaction is that removed groups cannot *revive*; with proximal SGD an exactly-zero group
revives only when its loss gradient norm exceeds λ, so compaction makes the already-taken pruning decisions final,
as PM would at the end of training.

After compaction (the parameters of changed blocks are new tensors):
  * the optimizer: pass it as ``optimizer=`` and it is updated in place (the old parameters are replaced by the
    new ones in its ``param_groups`` and per-parameter state such as SGD momentum or Adam moments is sliced to the
    surviving entries), so LR schedulers holding the optimizer keep working. Without ``optimizer=``, rebuild it
    over ``model.parameters()`` and, to keep momentum, call
    ``edp_det.edp.pruning.transfer_optimizer_state(old_opt.state, old_named_params, model, new_opt, report)``
    (``report.param_map`` has the same meaning as PM's);
  * the regulariser: pass it as ``regularizer=`` and its per-block entries are rebuilt, or construct a new
    ``EDPRegularizer(model, λ1, λ2, optimizer)``;
  * a DDP wrapper must be rebuilt (its buckets refer to the old parameters); run compaction at the same step on
    every rank (the masks are deterministic functions of the synchronised parameters);
  * gradients of changed parameters are gone (call it between steps, after ``optimizer.step()`` and the prox).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from edp_det.ops.block import CompressedAwareConv2d
from edp_det.edp.budget import structure_from_model
from edp_det.ops.graph import set_submodule, unwrap_model
from edp_det.ops.surgery import kept_indices, remap_optimizer, select, slice_norm

logger = logging.getLogger(__name__)

__all__ = ["compact_zero_groups", "CompactionReport", "CompactedLayer"]


@dataclass
class CompactedLayer:
    name: str
    before: tuple[int, int, int]   # (c_in, r, c_out)
    after: tuple[int, int, int]


@dataclass
class CompactionReport:
    """What :func:`compact_zero_groups` changed. ``param_map``: new parameter name -> (old name, [index tensor per
    dim or None]) for every parameter that was sliced (the format of :attr:`edp_det.PMReport.param_map`)."""

    layers: list[CompactedLayer] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    removed_columns: int = 0
    removed_channels: int = 0
    param_map: dict = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.layers)

    def summary(self) -> str:
        return (f"compacted {len(self.layers)} blocks: -{self.removed_columns} rank columns, "
                f"-{self.removed_channels} channels, params {self.params_before} -> {self.params_after}")


@torch.no_grad()
def compact_zero_groups(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, regularizer=None
                        ) -> CompactionReport:
    """Remove exactly-zero (or unread) groups of every CompressedAwareConv2d of ``model``, in place, keeping the
    blocks decomposed. See the module docstring for exactness and for what the caller must rebuild.

    Args:
        model: a decomposed model (DDP-wrapped is fine; rebuild the wrapper afterwards).
        optimizer: optional; updated in place to the new parameters (state sliced to the survivors).
        regularizer: optional :class:`~edp_det.EDPRegularizer`; its entries are rebuilt for the new blocks.
    Returns:
        CompactionReport (``report.changed`` is False, and nothing was touched, when no group was removable).
    """
    root = unwrap_model(model)
    struct = structure_from_model(root, need_positions=False)
    report = CompactionReport(params_before=sum(p.numel() for p in root.parameters()))
    for l in struct.layers:
        # hooks registered on a block would be lost silently with the replaced module: refuse up front
        if l.block._forward_hooks or l.block._forward_pre_hooks or l.block._backward_hooks:
            raise ValueError(f"{l.name!r} has hooks registered; remove them before compact_zero_groups")
    rows = [kept_indices(l.row_live) for l in struct.layers]
    full_rows = [len(rows[i]) == l.block.out_channels for i, l in enumerate(struct.layers)]
    old_names = {id(p): n for n, p in root.named_parameters()}
    remap: dict[int, tuple[torch.Tensor, list]] = {}   # id(old param) -> (new param, index per dim)
    for i, l in enumerate(struct.layers):
        b = l.block
        dev = b.coeff.weight.device
        if l.producer is not None and not full_rows[l.producer]:
            in_idx = rows[l.producer]
        else:
            in_idx = None
        col_idx = kept_indices(l.col_live)
        row_idx = rows[i] if not full_rows[i] else None
        ci = b.in_channels if in_idx is None else len(in_idx)
        r = len(col_idx)
        co = b.out_channels if row_idx is None else len(row_idx)
        if (ci, r, co) == (b.in_channels, b.rank, b.out_channels):
            continue
        all_in = torch.arange(b.in_channels, device=dev) if in_idx is None else in_idx
        all_out = torch.arange(b.out_channels, device=dev) if row_idx is None else row_idx
        new = CompressedAwareConv2d(ci, co, r, b.kernel_size, b.basis.stride, b.basis.padding, b.basis.dilation,
                                    bias=b.coeff.bias is not None, orig_in_channels=b.orig_in_channels,
                                    orig_out_channels=b.orig_out_channels, channel_prunable=b.channel_prunable,
                                    forward_mode=b.forward_mode)
        new.norm_name = b.norm_name
        new.to(device=dev, dtype=b.coeff.weight.dtype)
        new.train(b.training)
        new.basis.weight.copy_(select(b.basis.weight, col_idx, all_in))
        new.coeff.weight.copy_(select(b.coeff.weight, all_out, col_idx))
        new.basis.weight.requires_grad_(b.basis.weight.requires_grad)
        new.coeff.weight.requires_grad_(b.coeff.weight.requires_grad)
        remap[id(b.basis.weight)] = (new.basis.weight, [col_idx, all_in])
        remap[id(b.coeff.weight)] = (new.coeff.weight, [all_out, col_idx])
        if b.coeff.bias is not None:
            new.coeff.bias.copy_(b.coeff.bias[all_out])
            new.coeff.bias.requires_grad_(b.coeff.bias.requires_grad)
            remap[id(b.coeff.bias)] = (new.coeff.bias, [all_out])
        set_submodule(root, l.name, new)
        if row_idx is not None and l.norm is not None and b.norm_name is not None:
            new_norm = slice_norm(l.norm, row_idx, name=b.norm_name)
            if l.norm.affine:
                remap[id(l.norm.weight)] = (new_norm.weight, [row_idx])
                remap[id(l.norm.bias)] = (new_norm.bias, [row_idx])
            set_submodule(root, b.norm_name, new_norm)
        report.layers.append(CompactedLayer(l.name, (b.in_channels, b.rank, b.out_channels), (ci, r, co)))
        report.removed_columns += b.rank - r
        report.removed_channels += b.out_channels - co
    if not report.layers:
        report.params_after = report.params_before
        return report
    new_names = {id(p): n for n, p in root.named_parameters()}
    for old_id, (new_p, idx) in remap.items():
        report.param_map[new_names[id(new_p)]] = (old_names[old_id], idx)
    if optimizer is not None:
        remap_optimizer(optimizer, remap)
    if regularizer is not None:
        from edp_det.edp.regularizer import EDPRegularizer

        fresh = EDPRegularizer(root, regularizer.lambda_rank, regularizer.lambda_channel,
                               optimizer=regularizer.optimizer)
        regularizer.model = fresh.model
        regularizer.entries = fresh.entries
    report.params_after = sum(p.numel() for p in root.parameters())
    logger.info("%s", report.summary())
    return report
