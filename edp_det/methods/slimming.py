"""``slimming`` — Network Slimming (Liu et al., ICCV 2017): L1 on the scale factors γ of the normalisation
layers after channel-prunable convs, then removal of the channels with the smallest |γ|.

Schedule: during ``[0, compress.epoch_es)`` every optimizer step is followed by the proximal step of
``λ·Σ|γ|`` (soft-thresholding ``γ ← sign(γ)·max(|γ| − lr·λ, 0)``, λ = ``compress.slimming_lambda``, default
1e-4; SGD momentum of a γ set exactly to zero is cleared so that it is not revived by stale velocity). At the prune
point the channels with the smallest |γ| — one global threshold, as in the paper — are removed until the backbone
FLOPs cut reaches ``compress.flops_target`` (the largest |γ| of each layer is kept); then fine-tuning.

Frozen-BN detectors (torchvision's default ``FrozenBatchNorm2d``, ``model.norm: frozen``): a FrozenBatchNorm2d
has no trainable scale, so :meth:`SlimmingMethod.prepare` replaces each one that follows a channel-prunable,
trainable conv by a :class:`edp_det.ops.layers.FixedStatBatchNorm2d` holding the same statistics and affine values —
it still normalises with the fixed running statistics (train and eval mode, never batch statistics, never
updated), so the network computes exactly what it did, but γ and the shift are trainable parameters the L1
acts on. At the prune point these layers are turned back into FrozenBatchNorm2d (with the learned γ/shift) before
the surgery, which folds them into the convs as EDP does; fine-tuning then proceeds like the frozen-BN baseline.
With ``model.norm: bn`` the BatchNorm2d γ is used directly.

Exactness: a channel with γ = 0 outputs the constant ``relu(shift)``; the surgery adds that constant's
contribution to the consumers (bias / BatchNorm running mean), which is exact for 1×1 consumers and in the
interior of k×k ones; a channel with γ = 0 and shift ≤ 0 is removed exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.graph import build_channel_graph, get_submodule, set_submodule, unwrap_model
from edp_det.ops.layers import FixedStatBatchNorm2d
from edp_det.edp.regularizer import zero_momentum
from edp_det.methods.base import PruneResult
from edp_det.methods.common import PrunePointMethod, channel_prune_to_target, pm_result
from edp_det.runtime.schema import CompressOptions, option


@dataclass
class SlimmingOptions(CompressOptions):
    slimming_lambda: float = option(1e-4, "λ of the L1 penalty on the norm scales γ", gt=0,
                                    old="method_args.slimming_lambda")


def slimming_norms(model) -> dict[str, str]:
    """Conv name → name of its normalisation layer, for the channel-prunable convs of the backbone."""
    root = unwrap_model(model)
    return {n.name: n.norm for n in build_channel_graph(root, scope="backbone") if n.prunable and n.norm}


class SlimmingMethod(PrunePointMethod):
    name = "slimming"
    summary = "Network Slimming: L1 on norm scales γ, channels with the smallest |γ| removed"
    Options = SlimmingOptions
    regularized = True

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        self.lam = self.options.slimming_lambda
        self.optimizer = None
        self.gammas: list = []

    def prepare(self, model):
        if self.pruned:
            return model
        root = unwrap_model(model)
        for conv_name, norm_name in slimming_norms(root).items():
            norm = get_submodule(root, norm_name)
            if isinstance(norm, FrozenBatchNorm2d) and get_submodule(root, conv_name).weight.requires_grad:
                set_submodule(root, norm_name, FixedStatBatchNorm2d.from_frozen(norm))
        return model

    def _trainable_norms(self, model) -> dict[str, torch.nn.Module]:
        root = unwrap_model(model)
        out = {}
        for conv_name, norm_name in slimming_norms(root).items():
            norm = get_submodule(root, norm_name)
            if isinstance(norm, torch.nn.BatchNorm2d) and norm.affine and norm.weight.requires_grad:
                out[conv_name] = norm
        return out

    def attach(self, model, optimizer) -> None:
        self.optimizer = optimizer
        self.gammas = [] if self.pruned else [n.weight for n in self._trainable_norms(model).values()]

    @torch.no_grad()
    def after_step(self, model, lr: float, epoch: int) -> None:
        if not self.regularizing(epoch):
            return
        t = lr * self.lam
        state = self.optimizer.state if self.optimizer is not None else None
        for g in self.gammas:
            g.copy_(torch.sign(g) * (g.abs() - t).clamp_min(0))
            if state is not None:
                zero_momentum(state, g, g == 0)

    def epoch_stats(self, model, input_size) -> dict:
        if self.pruned:
            return {}
        gs = [n.weight.detach() for n in self._trainable_norms(model).values()]
        if not gs:
            return {}
        g = torch.cat([x.flatten() for x in gs]).abs()
        return {"zero_scale_channels": int((g == 0).sum()), "sparse_channels": float((g == 0).float().mean()),
                "gamma_abs_mean": float(g.mean())}

    def prune(self, model, input_size) -> PruneResult:
        root = unwrap_model(model)
        scores = {}
        for conv_name, norm in self._trainable_norms(root).items():
            scores[conv_name] = norm.weight.detach().abs().double()
        for name, m in list(root.named_modules()):
            if isinstance(m, FixedStatBatchNorm2d):
                set_submodule(root, name, m.to_frozen())
        report = channel_prune_to_target(root, scores, self.flops_target, input_size, round_to=self.round_to)
        self.pruned = True
        self.gammas = []
        return pm_result(report, self.name, criterion="abs(gamma), global threshold", slimming_lambda=self.lam)
