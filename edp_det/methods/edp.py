"""EDP (Algorithm 1) and its special cases as compression methods.

* ``edp``          λ1 (rank) and λ2 (channels) jointly; regularisation until ``epoch_es``, then PM.
* ``edp_rank``     λ2 = 0: the low-rank decomposition component only (case ① of §III-A).
* ``edp_channel``  λ1 = 0: the channel pruning component only (case ②).
* ``edp_separate`` the two components optimised one after the other (§IV-C-5): rank groups during the first
  half of the regularised epochs, channel groups during the second half, then PM.
"""
from __future__ import annotations

from torch import nn

from ..decompose import decompose, is_decomposed
from ..pruning import prune_and_merge
from ..regularizer import EDPRegularizer
from .base import CompressionMethod


class EDPMethod(CompressionMethod):
    name = "edp"
    use_rank = True
    use_channel = True

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        c = self.cfg
        self.lambda_rank = float(c.get("lambda_rank", 1e-3)) if self.use_rank else 0.0
        self.lambda_channel = float(c.get("lambda_channel", 1e-3)) if self.use_channel else 0.0
        self.epoch_es = int(c.get("epoch_es", max(1, total_epochs // 2)))
        if not 0 < self.epoch_es <= total_epochs:
            raise ValueError(f"compress.epoch_es={self.epoch_es} must be in [1, train.epochs={total_epochs}]")
        self.reg: EDPRegularizer | None = None
        self.pruned = False

    @property
    def prune_epoch(self):
        return None if self.pruned else self.epoch_es

    def regularizing(self, epoch: int) -> bool:
        return not self.pruned and epoch < self.epoch_es

    def prepare(self, model: nn.Module) -> nn.Module:
        if not is_decomposed(model) and not self.pruned:
            decompose(model, channel_prune=self.cfg.get("channel_prune", "auto") if self.use_channel else False,
                      init=self.cfg.get("init", "svd"), scope=self.cfg.get("scope", "backbone"),
                      forward_mode=self.cfg.get("forward_mode", "auto"))
        return model

    def attach(self, model, optimizer) -> None:
        if self.pruned or not is_decomposed(model):
            self.reg = None
            return
        self.reg = EDPRegularizer(model, self.lambda_rank, self.lambda_channel, optimizer=optimizer)

    def _lambdas(self, epoch: int) -> tuple[float, float]:
        return self.lambda_rank, self.lambda_channel

    def after_step(self, model, lr: float, epoch: int) -> None:
        if self.reg is not None and self.regularizing(epoch):
            lr_, lc = self._lambdas(epoch)
            for e in self.reg.entries:
                e.lam_col = lr_
                e.lam_row = lc if e.block.channel_prunable else 0.0
            self.reg.prox_step(lr)

    def prune(self, model, input_size) -> dict:
        target = self.cfg.get("flops_target")
        report = prune_and_merge(model, flops_target=target, input_size=input_size,
                                 round_to=self.cfg.get("round_to"))
        self.pruned = True
        self.reg = None
        out = report.to_dict()
        out["param_map"] = report.param_map
        out["table"] = report.format_table()
        return out

    def epoch_stats(self, model, input_size) -> dict:
        if self.pruned or not is_decomposed(model):
            return {}
        reg = self.reg or EDPRegularizer(model, 0.0, 0.0)
        return reg.sparsity(input_size=input_size)

    def state_dict(self) -> dict:
        return {"pruned": self.pruned}

    def load_state_dict(self, state: dict) -> None:
        self.pruned = bool(state.get("pruned", False))


class EDPRankMethod(EDPMethod):
    name = "edp_rank"
    use_channel = False


class EDPChannelMethod(EDPMethod):
    name = "edp_channel"
    use_rank = False


class EDPSeparateMethod(EDPMethod):
    name = "edp_separate"

    def _lambdas(self, epoch: int):
        half = max(1, self.epoch_es // 2)
        return (self.lambda_rank, 0.0) if epoch < half else (0.0, self.lambda_channel)
