"""``svd`` — low-rank approximation by truncated SVD (the "SVD" baseline of the paper's Fig. 4/5).

Schedule: train normally for ``compress.epoch_es`` epochs; at the prune point every conv in ``compress.scope``
(default the backbone body) is replaced by its truncated SVD — two convs ``LowRankConv2d(basis k×k → r, coeff 1×1 →
c_out)`` — with the ranks chosen globally by energy: singular directions are dropped in ascending order of the
share of their layer's energy that truncating there loses (``Σ_{k≥j} σ_k² / Σ σ_k²``), i.e. one energy threshold
for all layers, until the FLOPs cut reaches ``compress.flops_target``. A layer whose remaining rank does not pay
(two convs cost more than one, eq. 14) stays one convolution (its rank-r approximation, merged). Fine-tuning
follows (the LR schedule continues). No regulariser (the paper's SVD baseline pre-trains with a nuclear-norm
regulariser; this harness trains all methods with the same plain schedule before the prune point).

With a FrozenBatchNorm2d detector the frozen norm after a conv is folded into it first, so the SVD is of what the
conv + norm compute; with BatchNorm2d the conv weight itself is decomposed.
"""
from __future__ import annotations

from edp_det.methods.base import PruneResult, ScopedOptions
from edp_det.methods.common import PrunePointMethod, pm_result, rank_truncate_to_target


class SVDMethod(PrunePointMethod):
    name = "svd"
    summary = "truncated SVD with ranks chosen globally by energy"
    Options = ScopedOptions

    def prune(self, model, input_size) -> PruneResult:
        report = rank_truncate_to_target(model, self.flops_target, input_size,
                                         scope=self.options.scope, round_to=self.round_to)
        self.pruned = True
        # the factors are new parameters (the trained model was not decomposed): they start with fresh momentum
        return pm_result(report, self.name, criterion="singular-value energy, global threshold")
