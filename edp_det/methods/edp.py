"""EDP (Algorithm 1) and its special cases as compression methods.

* ``edp``          λ1 (rank) and λ2 (channels) jointly; regularisation until ``epoch_es`` (target-driven: until
  the zero groups reach the target), then PM.
* ``edp_rank``     λ2 = 0: the low-rank decomposition component only (case ① of §III-A).
* ``edp_channel``  λ1 = 0: the channel pruning component only (case ②).
* ``edp_separate`` the two components optimised one after the other (§IV-C-5): rank groups during the first
  half of the regularised epochs, channel groups during the second half, then PM.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edp_det.edp.budget import RANK_LAYERS, check_layer_weights, structure_from_model
from edp_det.edp.compaction import compact_zero_groups
from edp_det.edp.controller import GROUP_WEIGHTS, TargetController, group_weights
from edp_det.edp.decompose import decompose, is_decomposed
from edp_det.ops.block import FORWARD_MODES
from edp_det.runtime.distributed import broadcast_object
from edp_det.runtime.schema import option, section
from edp_det.deploy.latency import LATENCY_MODES, measure_time_per_flop
from edp_det.edp.pruning import prune_and_merge
from edp_det.ops.flops import cut_reaches, flops_cut
from edp_det.edp.regularizer import EDPRegularizer
from edp_det.methods.base import CompressionMethod, PruneResult, ScopedOptions

logger = logging.getLogger(__name__)


@dataclass
class LatencyOptions:
    """``compress.latency``: how the PM budget weighs layers: by their time per FLOP estimated from their shapes
    (``estimate``, the default), measured on this hardware (``aware``, or ``weights`` from an earlier run), or not at
    all (``estimate: false``, the paper's per-layer ratio); the measurement also gives the training-time weights of
    ``compress.group_weight: latency``."""

    estimate: bool = option(True, "PM budget (regularization: fixed): without measured weights, cut layers by "
                                  "their estimated time per FLOP (1 + 64 / output positions); false: no layer "
                                  "weights, the paper's per-layer ratio")

    aware: bool = option(False, "PM budget (regularization: fixed): cut layers that are slow per FLOP first "
                                "(measured at PM time)", old="latency_aware")
    batch: int = option(1, "batch size of the latency measurement (the serving batch)", ge=1, old="latency_batch")
    mode: str = option("marginal", "marginal: time a cut removes, per residual block; average: dense conv time "
                                   "per FLOP", choices=LATENCY_MODES, old="latency_mode")
    weights: str | None = option(None, "JSON {layer: weight} or the pm_report.json of an earlier run that measured "
                                       "them (latency.aware, group_weight: latency): reuse these weights instead of "
                                       "measuring", old="latency_weights")


@dataclass
class _RankOptions(ScopedOptions):
    lambda_rank: float = option(1e-3, "λ1: weight of the rank (β column) group penalty (regularization: target: "
                                      "only the ratio λ1:λ2 matters)", ge=0)


@dataclass
class _ChannelOptions(ScopedOptions):
    lambda_channel: float = option(1e-3, "λ2: weight of the output-channel (β row) group penalty", ge=0)
    channel_prune: str = option("auto", "auto: channel groups where output channels are free; none: rank only",
                                choices=("auto", "none"))


@dataclass
class _EDPCommonOptions(ScopedOptions):
    init: str = option("svd", "decomposition init: svd (β columns by singular value) | identity",
                       choices=("svd", "identity"))
    forward_mode: str = option("auto", "two_conv | effective (β·θ' merged) | auto: the cheaper per call",
                               choices=FORWARD_MODES)
    rank_layers: str = option("all", "layers whose rank groups training (regularization: target) and the PM "
                                     "budget may remove; tied: only those feeding a residual add",
                              choices=RANK_LAYERS)
    max_layer_cut: float | None = option(None, "PM budget (regularization: fixed): at most this fraction of a "
                                               "layer's live groups (per kind); null: all but one", gt=0, le=1)
    regularization: str = option("target", "target: with a flops_target, groups are trained to exactly zero "
                                           "until they cut it (after a quarter of the phase up to Epoch_ES), held "
                                           "there, and PM follows that epoch (λ1:λ2 only set the ratio of the two "
                                           "kinds); fixed: the paper's constant λ1/λ2, PM after Epoch_ES",
                                 choices=("fixed", "target"))
    group_weight: str = option("uniform", "penalty weight of a group during training: uniform (the paper) | flops "
                                          "(FLOPs its removal saves) | latency (time it saves, measured as "
                                          "compress.latency says; experimental)", choices=GROUP_WEIGHTS)
    stop_reg_at_target: bool = option(True, "regularization fixed: stop the prox once the zero groups alone reach "
                                            "flops_target")
    compact: bool = option(False, "after each regularised epoch before the one PM follows, remove groups already "
                                  "exactly zero")
    latency: LatencyOptions = section(LatencyOptions, "latency-aware PM budget")


@dataclass
class EDPOptions(_EDPCommonOptions, _ChannelOptions, _RankOptions):
    """Options of ``edp`` and ``edp_separate``."""


@dataclass
class EDPRankOptions(_EDPCommonOptions, _RankOptions):
    """Options of ``edp_rank`` (no channel groups)."""


@dataclass
class EDPChannelOptions(_EDPCommonOptions, _ChannelOptions):
    """Options of ``edp_channel`` (no rank penalty)."""


class EDPMethod(CompressionMethod):
    """Algorithm 1.

    ``compress.regularization: target`` (the default; needs a ``flops_target``, else the regularisation is
    fixed): λ is not taken from the config; :class:`edp_det.edp.controller.TargetController` fades the groups in
    the PM budget's order so that the groups trained to exactly zero cut ``flops_target`` by Epoch_ES (within
    :attr:`TARGET_TOLERANCE`), after which they are held at zero (weights and optimizer state) until PM, which
    removes only zeros and runs at the end of the epoch in which the target was reached (:attr:`prune_epoch`;
    Epoch_ES bounds the regularised phase). λ1:λ2 of the config set the ratio between the two kinds;
    ``group_weight`` how groups of different layers are weighed. If the phase ends before the target is reached, PM
    tops the cut up with the budget's norm ranking (WARNING naming the share the zero groups gave).

    ``regularization: fixed``: the paper's constant λ (prox threshold lr·λ·group weight). With
    ``stop_reg_at_target`` (default on) and a ``flops_target``, the FLOPs cut of the exactly-zero groups never
    exceeds the target by more than :attr:`TARGET_TOLERANCE`: before every proximal step that would set a non-zero
    group exactly to zero, the cut the zero groups would then give is computed and
      * below the target: the step is applied;
      * reaching the target, by at most the tolerance: the step is applied and the proximal steps stop for the rest
        of the regularised phase (INFO);
      * beyond target + tolerance (a λ too strong for the schedule): the step is *not* applied, the proximal steps
        stop (WARNING naming λ), and PM's FLOPs-target selection removes the weakest groups up to the target.
    With ``stop_reg_at_target: false`` the prox runs to ``epoch_es`` whatever it zeroes, and PM warns when the cut
    exceeds target + tolerance.

    The controlled mode needs the number of optimizer steps per epoch (:attr:`iters_per_epoch`, set by the
    trainer) and :attr:`input_size`."""

    name = "edp"
    summary = "EDP: rank (λ1) and channel (λ2) groups jointly, then PM"
    Options = EDPOptions
    use_rank = True
    use_channel = True
    TARGET_TOLERANCE = 0.02

    def __init__(self, compress_cfg=None, total_epochs: int = 1):
        super().__init__(compress_cfg, total_epochs)
        o = self.options
        self.lambda_rank = o.lambda_rank if self.use_rank else 0.0
        self.lambda_channel = o.lambda_channel if self.use_channel else 0.0
        self.check_schedule(total_epochs)
        self.epoch_es = o.epoch_es
        self.reg: EDPRegularizer | None = None
        self.pruned = False
        # target-aware regularisation: no prox step may take the exactly-zero groups beyond flops_target (+ the
        # tolerance); a strong λ can otherwise zero far more than was asked for
        self.stop_at_target = o.stop_reg_at_target
        self.rank_layers = o.rank_layers
        self.max_layer_cut = o.max_layer_cut
        self.latency_aware = o.latency.aware
        self.group_weight = o.group_weight
        self.target_driven = o.regularization == "target" and o.flops_target is not None
        self.latency_batch = o.latency.batch
        self.latency_mode = o.latency.mode
        self.latency_weights = self._load_latency_weights(o.latency.weights)
        self.latency_estimate = o.latency.estimate
        if not o.latency.estimate and (o.latency.aware or o.latency.weights is not None):
            raise ValueError("compress.latency.estimate=false has no effect with measured layer weights "
                             "(compress.latency.aware / compress.latency.weights): drop one of them")
        if self.target_driven:
            self._reject_budget_options(o)
        self.compact_zero = o.compact
        self.steps = 0
        self.reg_stopped_step: int | None = None
        self._structure = None
        #: optimizer steps per epoch (the trainer sets it); the controlled mode needs it
        self.iters_per_epoch: int | None = None
        self.controller: TargetController | None = None
        self._controller_state: dict | None = None
        #: the epoch (1-based, the engine's count) in which the controller reached the target: PM follows it
        self.target_epoch: int | None = None
        self._weights: dict | None = None      # group weights, computed once per decomposed model
        self._layer_time: dict | None = None   # measured time per FLOP (group_weight: latency)

    @staticmethod
    def _reject_budget_options(o) -> None:
        """With ``regularization: target`` training chooses every removed group and PM removes only the zeros: an
        option that steers the PM budget's own choice would either do nothing or, like ``round_to`` (which rounds the
        live counts down), remove trained groups after all. Such an option set is a configuration error."""
        # (key, value, its default, what it belongs to): set to anything but its default, it is an error here
        checks = [("compress.round_to", o.round_to, None, "the PM budget"),
                  ("compress.max_layer_cut", o.max_layer_cut, None, "the PM budget"),
                  ("compress.latency.aware", o.latency.aware, False, "the PM budget"),
                  ("compress.latency.estimate", o.latency.estimate, True, "the PM budget"),
                  ("compress.stop_reg_at_target", o.stop_reg_at_target, True, "compress.regularization=fixed")]
        if o.group_weight != "latency":
            checks.append(("compress.latency.weights", o.latency.weights, None,
                           "the PM budget and compress.group_weight=latency"))
        for key, value, default, owner in checks:
            if value != default:
                hint = " (compress.group_weight=latency weighs training's choice by measured time)" \
                    if key.startswith("compress.latency") else ""
                raise ValueError(f"{key}={value!r} is an option of {owner}; with compress.regularization=target (the "
                                 f"default with a flops_target) training chooses the groups and PM removes only "
                                 f"those trained to zero: drop it or set compress.regularization=fixed{hint}")

    @property
    def prune_epoch(self):
        """Epochs after which PM runs: ``epoch_es``, or under ``regularization: target`` the end of the epoch in
        which the zero groups reached the target, if that comes first (from then on nothing is regularised: the
        network PM keeps trains on as plain and smaller convolutions instead of as the full decomposed one with
        its zero groups held)."""
        if self.pruned:
            return None
        if self.target_epoch is None or not self.target_driven:
            return self.epoch_es
        return min(self.epoch_es, self.target_epoch)

    def regularizing(self, epoch: int) -> bool:
        return not self.pruned and epoch < self.epoch_es

    def prepare(self, model: nn.Module) -> nn.Module:
        if not is_decomposed(model) and not self.pruned:
            o = self.options
            decompose(model, channel_prune=o.channel_prune if self.use_channel else False, init=o.init,
                      scope=o.scope, forward_mode=o.forward_mode)
        return model

    def attach(self, model, optimizer) -> None:
        if self.pruned or not is_decomposed(model):
            self.reg = None
            return
        self.reg = EDPRegularizer(model, self.lambda_rank, self.lambda_channel, optimizer=optimizer)
        self._structure = None
        if self.controller is not None:
            self._controller_state = self.controller.state_dict()
        self.controller = None
        self._weights = None
        if self.group_weight == "latency" and self._layer_time is None:
            self._layer_time = self._measure_layer_time(model, self.input_size)

    def _kinds(self) -> tuple:
        return tuple(k for k, on in (("col", self.use_rank), ("row", self.use_channel)) if on)

    def _measure_layer_time(self, model, input_size) -> dict:
        if self.latency_weights is not None:
            return self.latency_weights          # measured once, reused: the same structure every run
        if input_size is None:
            raise ValueError("EDP: compress.group_weight=latency needs the input size (method.input_size)")
        # every rank must weigh the groups the same: rank 0's measurement is used everywhere
        return broadcast_object(measure_time_per_flop(model, input_size=tuple(input_size),
                                                      batch_size=self.latency_batch, mode=self.latency_mode))

    def _structure_now(self):
        if self._structure is None:   # layers and their positions do not change while the blocks stay decomposed
            if self.input_size is None:
                raise ValueError(f"EDP: compress.group_weight={self.group_weight} / regularization=target need the "
                                 f"input size the FLOPs are counted at (method.input_size; the trainer sets it)")
            self._structure = structure_from_model(self.reg.model, input_size=self.input_size)
        return self._structure

    def _group_weights(self) -> dict | None:
        """Per-layer weights of the penalty (None: uniform)."""
        if self.group_weight == "uniform":
            return None
        if self._weights is None:
            self._weights = group_weights(self._structure_now(), self.group_weight, self._layer_time,
                                          kinds=self._kinds())
        return self._weights

    def _ensure_controller(self) -> TargetController:
        if self.controller is None:
            if not self.iters_per_epoch:
                raise ValueError("EDP: regularization=target needs the optimizer steps per epoch "
                                 "(method.iters_per_epoch; the trainer sets it)")
            weights = self._group_weights()
            if weights is None:
                weights = group_weights(self._structure_now(), "uniform", kinds=self._kinds())
            self.controller = TargetController(self.reg, self._structure_now(), float(self.options.flops_target),
                                               self.epoch_es * int(self.iters_per_epoch), weights=weights,
                                               kinds=self._kinds(), rank_layers=self.rank_layers)
            if self._controller_state:
                self.controller.load_state_dict(self._controller_state)
        return self.controller

    @staticmethod
    def _load_latency_weights(path) -> dict | None:
        """``compress.latency.weights``: a JSON file of ``{layer name: weight}``, or a ``pm_report.json`` of an
        earlier latency-aware run (its ``layer_weights``), so that PM reuses those weights instead of measuring."""
        if path is None:
            return None
        if not isinstance(path, str) or not Path(path).is_file():
            raise ValueError(f"compress.latency.weights={path!r}: not a file")
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"compress.latency.weights: {path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("layer_weights"), dict):
            data = data["layer_weights"]
        if not isinstance(data, dict) or not data:
            raise ValueError(f"compress.latency.weights: {path}: expected an object of layer name -> weight "
                             f"(or a pm_report.json with 'layer_weights')")
        try:   # values only: the names are checked against the model's layers by prune_and_merge
            return check_layer_weights(data, data.keys())
        except (TypeError, ValueError) as e:
            raise ValueError(f"compress.latency.weights: {path}: {e}") from None

    def compacts(self, epoch: int) -> bool:
        # after every regularised epoch but the last (PM follows that one)
        pm = self.prune_epoch
        return self.compact_zero and self.regularizing(epoch) and pm is not None and epoch + 1 < pm

    def compact(self, model, optimizer):
        report = compact_zero_groups(model, optimizer=optimizer, regularizer=self.reg)
        if report.changed:
            self._structure = None    # the target check's cached structure describes the old blocks
            self._weights = None
            if self.controller is not None:
                self.controller.weights = self._group_weights() or group_weights(
                    self._structure_now(), "uniform", kinds=self._kinds())
                self.controller.reset_structure(self._structure_now())
        return report

    def _lambdas(self, epoch: int) -> tuple[float, float]:
        return self.lambda_rank, self.lambda_channel

    def after_step(self, model, lr: float, epoch: int) -> None:
        if self.reg is not None and self.regularizing(epoch) and self.target_driven:
            self.steps += 1
            ctrl = self._ensure_controller()
            ctrl.step(*self._lambdas(epoch))
            if self.target_epoch is None and ctrl.frozen_step is not None:
                # the epoch that PM follows, in the engine's own count (one derived from the step count would be
                # misplaced by skipped optimizer steps, e.g. AMP's, or a resume with other steps per epoch; a
                # checkpoint saved frozen without it gets the epoch it resumes in)
                self.target_epoch = epoch + 1
            return
        if self.reg is not None and self.regularizing(epoch) and self.reg_stopped_step is None:
            lr_, lc = self._lambdas(epoch)
            weights = self._group_weights() or {}
            for e in self.reg.entries:
                wc, wr = weights.get(e.name, (1.0, 1.0))
                e.lam_col = lr_ * wc
                e.lam_row = lc * (wr or 0.0) if e.block.channel_prunable else 0.0
            self.steps += 1
            guarded = self.stop_at_target and self.options.flops_target is not None and self.input_size is not None
            self.reg.prox_step(lr, guard=self._target_guard if guarded else None)

    def _target_guard(self, zero: dict) -> bool:
        """Whether a prox step that zeroes the groups in ``zero`` may be applied (see the class docstring)."""
        target = float(self.options.flops_target)
        struct = self._structure_now()
        struct.refresh(zero=zero)     # live masks as the step would leave them
        after = struct.flops_after()
        if not cut_reaches(struct.original_flops, after, target):
            return True
        cut = flops_cut(struct.original_flops, after)
        self.reg_stopped_step = self.steps
        if cut <= target + self.TARGET_TOLERANCE:
            logger.info("EDP: the zero groups alone reach the FLOPs target %.3f (cut %.4f) at regularised step %d; "
                        "proximal steps stopped until PM", target, cut, self.steps)
            return True
        struct.refresh()              # as the weights are: the step is not applied
        logger.warning("EDP: regularised step %d would zero groups cutting %.1f %% of the FLOPs (the zero groups "
                       "cut %.1f %% before it), more than the target %.1f %% + %.1f points: the step was not applied "
                       "and proximal steps stop; PM removes the weakest groups up to the target (lambda_rank=%g, "
                       "lambda_channel=%g: a lambda too strong for the schedule does this early)", self.steps,
                       100 * cut, 100 * flops_cut(struct.original_flops, struct.flops_after()), 100 * target,
                       100 * self.TARGET_TOLERANCE, self.lambda_rank, self.lambda_channel)
        return False

    def prune(self, model, input_size) -> PruneResult:
        target = self.options.flops_target
        weights = "estimate" if self.latency_estimate else None   # shape-based layer weights (edp_det.edp.budget)
        if self._layer_time is not None and target is not None:
            weights = self._layer_time               # group_weight=latency: the time training weighed groups by
        elif self.latency_weights is not None and target is not None:
            weights = self.latency_weights           # measured once, reused: the same structure every run
        elif self.latency_aware and target is not None:
            # every rank must choose the same groups: rank 0's measurement is used everywhere
            weights = broadcast_object(measure_time_per_flop(model, input_size=tuple(input_size),
                                                             batch_size=self.latency_batch,
                                                             mode=self.latency_mode))
        controlled = self.controller is not None
        frozen = controlled and self.controller.frozen_step is not None
        report = prune_and_merge(model, flops_target=target, input_size=input_size,
                                 round_to=self.options.round_to, rank_layers=self.rank_layers,
                                 layer_weights=weights, max_layer_cut=self.max_layer_cut)
        self.pruned = True
        self.reg = None
        self.controller = None
        if self.target_driven and report.r_flops_from_zero_groups < 0.95 * float(target):
            logger.warning("EDP: the groups trained to zero cut only %.1f %% of the FLOPs (target %.1f %%%s); PM "
                           "removed %d more groups by the budget's ranking to reach it (give the regularised phase "
                           "more steps: compress.epoch_es)", 100 * report.r_flops_from_zero_groups, 100 * float(target),
                           "" if frozen or not controlled else ", not reached in the regularised phase",
                           report.budget_removed_groups)
        if target is not None and report.achieved_r_flops > float(target) + self.TARGET_TOLERANCE:
            logger.warning("EDP: the pruned model cuts %.1f %% of the FLOPs where %.1f %% was requested (the groups "
                           "training zeroed cut %.1f %%; compress.stop_reg_at_target=%s)", 100 * report.achieved_r_flops,
                           100 * float(target), 100 * report.r_flops_from_zero_groups, self.stop_at_target)
        out = report.to_dict()
        # PM removed only groups trained to zero (and merged): the network computes the same function
        out["lossless"] = report.budget_removed_groups == 0
        if target is not None:
            out["zero_share_of_target"] = report.r_flops_from_zero_groups / float(target)
        if isinstance(weights, dict):
            out["layer_weights"] = weights           # pm_report.json: reusable as compress.latency.weights
        return PruneResult(report=out, table=report.format_table(), param_map=report.param_map,
                           function_preserved=self.target_driven and out["lossless"])

    def epoch_stats(self, model, input_size) -> dict:
        if self.pruned or not is_decomposed(model):
            return {}
        reg = self.reg or EDPRegularizer(model, 0.0, 0.0)
        out = reg.sparsity(input_size=input_size)
        if self.reg_stopped_step is not None:
            out["reg_stopped_step"] = self.reg_stopped_step
        out.update(self.step_stats())
        return out

    def step_stats(self) -> dict:
        """The controller's latest record: λ per kind, zero-group FLOPs cut and its reference, live counts."""
        return dict(self.controller.record) if self.controller is not None else {}

    def state_dict(self) -> dict:
        out = {"pruned": self.pruned, "steps": self.steps, "reg_stopped_step": self.reg_stopped_step,
               "target_epoch": self.target_epoch}
        ctrl = self.controller.state_dict() if self.controller is not None else self._controller_state
        if ctrl:
            out["controller"] = ctrl
        if self._layer_time is not None:
            # group_weight=latency: a resumed run weighs the groups by the same measurement
            out["layer_time"] = dict(self._layer_time)
        return out

    def load_state_dict(self, state: dict) -> None:
        self.pruned = bool(state.get("pruned", False))
        self.steps = int(state.get("steps", 0))
        stopped = state.get("reg_stopped_step")
        self.reg_stopped_step = None if stopped is None else int(stopped)
        self._controller_state = state.get("controller")
        reached = state.get("target_epoch")
        self.target_epoch = None if reached is None else int(reached)
        layer_time = state.get("layer_time")
        if layer_time is not None and self.group_weight == "latency":
            self._layer_time = check_layer_weights(dict(layer_time), layer_time.keys())


class EDPRankMethod(EDPMethod):
    name = "edp_rank"
    summary = "EDP's low-rank component only (λ2 = 0)"
    Options = EDPRankOptions
    use_channel = False


class EDPChannelMethod(EDPMethod):
    name = "edp_channel"
    summary = "EDP's channel-pruning component only (λ1 = 0)"
    Options = EDPChannelOptions
    use_rank = False


class EDPSeparateMethod(EDPMethod):
    name = "edp_separate"
    summary = "EDP's two components one after the other (rank, then channels)"

    def _lambdas(self, epoch: int):
        half = max(1, self.epoch_es // 2)
        return (self.lambda_rank, 0.0) if epoch < half else (0.0, self.lambda_channel)
