"""The small interface every compression method implements; the training engine calls it at fixed points.

Life cycle inside :class:`edp_det.train.engine.Trainer` (Algorithm 1 generalised)::

    model = method.prepare(model)                 # before training (e.g. decompose)
    method.attach(model, optimizer)               # whenever the optimizer is (re)built
    for epoch ...:
        for step ...:
            loss = task_loss + method.extra_loss(model)     # differentiable penalties, if any
            optimizer.step(); method.after_step(model, lr, epoch)   # proximal steps, masks ...
        if epoch + 1 >= method.prune_epoch:        # None: never; after it, prune_epoch is None
            method.calibrate(model, batches, device)      # only if method.calibration_batches > 0
            result = method.prune(model, input_size)      # structure changes -> PruneResult
    method.epoch_stats(model, input_size)         # sparsity curves for the report

``prune`` returns a :class:`PruneResult`: the report (written to ``pm_report.json``), the per-layer table
(``layers.txt``) and, where parameters were sliced rather than replaced, a ``param_map`` (see
:func:`edp_det.edp.pruning.transfer_optimizer_state`) so that optimizer state survives the structural change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from edp_det.runtime.schema import CompressOptions, option, parse_options


@dataclass
class PruneResult:
    """What :meth:`CompressionMethod.prune` hands back to the engine."""

    #: JSON-serialisable report, written to ``pm_report.json``
    report: dict = field(default_factory=dict)
    #: human-readable per-layer table, written to ``layers.txt`` (None: no file)
    table: str | None = None
    #: new parameter name -> (old name, kept indices per dim) for carrying optimizer state (None: nothing carried)
    param_map: dict | None = None
    #: PM left the network's function unchanged (it removed only exact zeros and merged), so the BatchNorm running
    #: statistics still hold and the engine does not re-estimate them
    function_preserved: bool = False


@dataclass
class ScopedOptions(CompressOptions):
    """Options of the methods that can compress more than the backbone body."""

    scope: str = option("backbone", "backbone: the ResNet body; detector: also FPN and RPN head (low-rank only)",
                        choices=("backbone", "detector"))


class CompressionMethod:
    """The uncompressed baseline: trains the same detector with the same schedule and changes nothing.

    Every method declares the options it reads (the ``compress`` section of the config) as :attr:`Options`, a
    dataclass extending :class:`edp_det.runtime.schema.CompressOptions` with typed fields (default, help, allowed
    values); the constructor checks ``compress_cfg`` against it (unknown keys, types, ranges) and stores the result
    as :attr:`options`. The baseline reads none of the common options.
    """

    name = "baseline"
    #: one line for the config reference
    summary = "the uncompressed network, same schedule"
    #: the options this method reads (the config's ``compress`` section)
    Options: type[CompressOptions] = CompressOptions
    #: training batches the engine hands to :meth:`calibrate` right before :meth:`prune` (0: none)
    calibration_batches = 0

    def __init__(self, compress_cfg: dict | None = None, total_epochs: int = 1):
        self.options = self.parse_options(compress_cfg)
        self.total_epochs = int(total_epochs)
        #: (C, H, W) the FLOPs are counted at; the engine sets it from the task
        self.input_size: tuple | None = None

    @classmethod
    def parse_options(cls, compress_cfg: dict | None):
        """``compress_cfg`` checked against :attr:`Options` (ConfigError naming the key); missing keys: defaults."""
        return parse_options(cls.Options, compress_cfg, mount="compress", source=f"method {cls.name!r}")

    def check_schedule(self, total_epochs: int) -> None:
        """ValueError if ``compress.epoch_es`` does not fit in ``train.epochs``."""
        if not self.options.epoch_es <= total_epochs:
            raise ValueError(f"compress.epoch_es={self.options.epoch_es} must be in [1, train.epochs={total_epochs}]")

    # --- schedule
    @property
    def prune_epoch(self) -> int | None:
        """Number of finished epochs after which :meth:`prune` runs (None: never; the engine prunes at the first
        epoch end at or after it, then this must become None)."""
        return None

    def regularizing(self, epoch: int) -> bool:
        return False

    # --- hooks
    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def attach(self, model: nn.Module, optimizer) -> None:
        pass

    def extra_loss(self, model: nn.Module, epoch: int):
        return None

    def after_step(self, model: nn.Module, lr: float, epoch: int) -> None:
        pass

    def compacts(self, epoch: int) -> bool:
        """Whether the engine should call :meth:`compact` once ``epoch`` (0-based) has finished."""
        return False

    def compact(self, model: nn.Module, optimizer):
        """Physically remove groups training has already zeroed, in place; returns a
        :class:`~edp_det.edp.compaction.CompactionReport` (or None). The engine rebuilds the DDP wrapper after it."""
        return None

    def calibrate(self, model: nn.Module, batches, device) -> None:
        """Look at ``calibration_batches`` training batches (an iterable of the task's raw batches, e.g.
        ``(images, targets)`` for detection) before :meth:`prune`; e.g. to record layer inputs."""

    def prune(self, model: nn.Module, input_size) -> PruneResult:
        return PruneResult()

    def epoch_stats(self, model: nn.Module, input_size) -> dict:
        return {}

    def step_stats(self) -> dict:
        """Numbers merged into the engine's periodic step records (``train.log_interval``)."""
        return {}

    # --- resume
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
