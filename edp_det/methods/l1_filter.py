"""``l1_filter`` — pruning filters by their L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

Schedule (same harness as EDP): train normally for ``compress.epoch_es`` epochs; at the prune point rank the output
channels of every channel-prunable conv (see :mod:`edp_det.ops.graph`: Bottleneck conv1/conv2, BasicBlock conv1, the
stem where free) by the L1 norm of their filters and remove the weakest until the backbone FLOPs cut reaches
``compress.flops_target``; fine-tune for the remaining epochs (the LR schedule continues).

Scores are compared across layers after dividing by the layer's mean filter L1 norm (``compress.l1_normalize:
mean``, default; ``none`` compares raw norms): with a normalisation layer after every conv the absolute filter
scale carries no meaning across layers, so a layer-relative ranking with one global threshold is used instead of
Li et al.'s per-layer sensitivity analysis. The strongest filter of each layer is always kept.

Surgery: :func:`edp_det.methods.common.channel_prune_to_target` (exact channel removal through decompose →
budget → PM, blocks merged back into plain convolutions; a removed channel's constant post-ReLU output is absorbed
by its consumers' bias / BatchNorm running mean). With a FrozenBatchNorm2d detector the frozen norms after the
convs end folded into the convs' bias, as in EDP's PM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edp_det.ops.graph import build_channel_graph, get_submodule, unwrap_model
from edp_det.methods.base import PruneResult
from edp_det.methods.common import PrunePointMethod, channel_prune_to_target, pm_result
from edp_det.runtime.schema import CompressOptions, option


@dataclass
class L1FilterOptions(CompressOptions):
    l1_normalize: str = option("mean", "compare filter L1 norms across layers after dividing by the layer mean "
                                       "(mean) or raw (none)", choices=("mean", "none"),
                               old="method_args.l1_normalize")


def l1_filter_scores(model, normalize: str = "mean") -> dict[str, torch.Tensor]:
    """Conv name → per-output-channel filter L1 norm (divided by the layer mean with ``normalize="mean"``) for
    every channel-prunable conv of the backbone."""
    root = unwrap_model(model)
    scores = {}
    for node in build_channel_graph(root, scope="backbone"):
        if not node.prunable:
            continue
        conv = get_submodule(root, node.name)
        if not conv.weight.requires_grad:   # frozen stages are left alone
            continue
        l1 = conv.weight.detach().abs().double().flatten(1).sum(dim=1)
        if normalize == "mean":
            l1 = l1 / l1.mean().clamp_min(1e-300)
        scores[node.name] = l1
    return scores


class L1FilterMethod(PrunePointMethod):
    name = "l1_filter"
    summary = "filters pruned by L1 norm at the prune point"
    Options = L1FilterOptions

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        self.normalize = self.options.l1_normalize

    def prune(self, model, input_size) -> PruneResult:
        scores = l1_filter_scores(model, self.normalize)
        report = channel_prune_to_target(model, scores, self.flops_target, input_size, round_to=self.round_to)
        self.pruned = True
        return pm_result(report, self.name, criterion=f"filter L1 ({self.normalize})")
