"""The training engine: Algorithm 1 for any task and any compression method, in one loop.

    decompose (method.prepare) → train with task loss + proximal steps → at ``epoch_es``: PM (method.prune),
    optimizer rebuilt with surviving momentum, learning-rate schedule continuing (not restarted) → train to the
    end → save_compressed → evaluate → benchmark.

A *task* (detection, classification) supplies data, model, loss, evaluation and FLOPs/benchmark figures; a
*method* (:mod:`edp_det.methods`) supplies what happens around each step and at the prune point. The engine owns
the optimizer, LR schedule, AMP, DDP, checkpoints and logs.

Determinism and resume: every epoch starts by seeding all RNGs from ``(seed, epoch, rank)`` and the data order
from ``(seed, epoch)``; checkpoints are written at epoch ends and hold the architecture spec, so a run resumed
from any checkpoint (before or after PM) continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from edp_det.edp.calibration import batchnorm_layers, recalibrate_batchnorm
from edp_det.runtime.checkpoint import CheckpointManager, atomic_write_text, load_checkpoint, resolve_resume
from edp_det.runtime.config import check_device, config_differences, dump_config
from edp_det.runtime.distributed import barrier, broadcast_object, init_distributed, seed_everything
from edp_det.runtime.errors import ConfigError, EDPError
from edp_det.ops.graph import unwrap_model
from edp_det.runtime.logs import (MetricsLogger, ProgressMeter, console_logging_above, format_duration, format_metrics,
                                  open_tensorboard, progress)
from edp_det.runtime.rundir import RunDirError, check_run_dir, start_run_dir, truncate_metrics_log
from edp_det.methods import build_method
from edp_det.models import describe_model
from edp_det.edp.pruning import PMReport, transfer_optimizer_state
from edp_det.deploy.serialization import apply_spec, architecture_spec, save_compressed

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingError", "build_optimizer", "lr_at"]


class TrainingError(EDPError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is left intact."""


def build_optimizer(model: nn.Module, tcfg: dict) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=tcfg["lr"], momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"])
    if tcfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    raise ValueError(f"train.optimizer={tcfg['optimizer']!r}: choose 'sgd' or 'adamw'")


def lr_at(step: int, iters_per_epoch: int, tcfg: dict) -> float:
    """Learning rate at global ``step``: linear warm-up, then step decay at ``lr_steps`` epochs or cosine."""
    base = tcfg["lr"]
    total = max(1, tcfg["epochs"] * iters_per_epoch)
    if tcfg["lr_schedule"] == "step":
        factor = tcfg["lr_gamma"] ** sum(step >= e * iters_per_epoch for e in tcfg["lr_steps"])
    elif tcfg["lr_schedule"] == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    else:
        raise ValueError(f"train.lr_schedule={tcfg['lr_schedule']!r}: choose 'step' or 'cosine'")
    warm = tcfg["warmup_iters"]
    if warm and step < warm:
        alpha = step / warm
        factor *= tcfg["warmup_factor"] * (1 - alpha) + alpha
    return base * factor


class Trainer:
    """Runs one training job. ``task`` implements the task protocol (see :mod:`edp_det.train.detection`).

    ``resume``: None (start a new run), ``"auto"`` (the latest checkpoint in ``output_dir``, or a new run when
    there is none) or a checkpoint path. A new run refuses an ``output_dir`` that holds another run unless
    ``overwrite`` (clears that run's files first; see :func:`edp_det.runtime.rundir.prepare_run_dir`).

    :meth:`run` is three phases: :meth:`setup` (device, data, model, method, resume, optimizer; the output
    folder is written only once all of it succeeded), then per epoch :meth:`train_epoch` (the steps) and
    :meth:`end_epoch` (compaction, PM, evaluation, checks, log, checkpoint), then :meth:`finalize`
    (final model, evaluation, metrics.json).
    """

    def __init__(self, cfg: dict, task, output_dir, resume=None, overwrite: bool = False):
        self.cfg = cfg
        self.task = task
        self.out = Path(output_dir)
        self.resume = resume
        self.overwrite = bool(overwrite)
        self.tcfg = cfg["train"]

    # ------------------------------------------------------------------ helpers
    def _device(self, dist) -> torch.device:
        want = self.cfg["device"]
        if dist.distributed:
            return dist.device
        if want:
            check_device(want, "device", available=True)
            return torch.device(want)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _wrap(self, model, dist):
        if not dist.distributed:
            return model
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    def _checkpoint_state(self, epoch) -> dict:
        root = unwrap_model(self.model)
        return {"model": {k: v.detach().cpu() for k, v in root.state_dict().items()},
                "spec": architecture_spec(root), "arch": describe_model(root),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "method": self.method.state_dict(), "epoch": epoch, "global_step": self.step, "config": self.cfg,
                "world_size": self.dist.world_size,
                "classes": list(getattr(self.task, "classes", []) or []), "train_time_s": self._train_time()}

    def _check_resumable(self, ckpt: dict, path) -> None:
        """A resumed run continues the saved one: the same settings (but where it writes, reads and runs, how it logs
        and measures: :data:`edp_det.runtime.config.RESUME_FREE_KEYS`), and epochs left to train."""
        diffs = config_differences(ckpt.get("config") or {}, self.cfg)
        if diffs:
            shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs[:3])
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise ConfigError(f"--resume {path}: this command changes what the run trains: {shown}{more}; resume with "
                              f"the run's settings (its config.yaml), or start a new run in another --output-dir")
        saved, now = list(ckpt.get("classes") or []), list(getattr(self.task, "classes", []) or [])
        if saved and now and saved != now:
            raise ConfigError(f"--resume {path}: the run was trained on the classes {','.join(saved)} (label order), "
                              f"the data now gives {','.join(now)}: resume on the run's data, or set data.classes")
        world = ckpt.get("world_size")
        if world is not None and int(world) != self.dist.world_size:
            raise ConfigError(f"--resume {path}: the run trained on {world} process(es), this one has "
                              f"{self.dist.world_size}: the global batch (and so each step) would differ; resume with "
                              f"{world} process(es)")
        if int(ckpt["epoch"]) + 1 >= int(self.tcfg["epochs"]) and (self.out / "metrics.json").is_file():
            raise RunDirError(f"--resume {path}: the run in {self.out} is finished (epoch {int(ckpt['epoch']) + 1} of "
                              f"{self.tcfg['epochs']}, metrics.json written): nothing to resume")

    def _train_time(self) -> float:
        return self.train_time_before + (time.time() - self.t_start)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        self.setup()
        for epoch in range(self.start_epoch, self.tcfg["epochs"]):
            epoch_rec = self.train_epoch(epoch)
            self.end_epoch(epoch, epoch_rec)
        return self.finalize()

    def setup(self) -> None:
        """Everything before the first step. Raises on bad input before the output folder is written to."""
        cfg, tcfg = self.cfg, self.tcfg
        self.dist = dist = init_distributed()
        self.device = device = self._device(dist)
        if self.cfg.get("benchmark", {}).get("enabled"):   # before training, not when the final benchmark starts
            check_device(self.cfg["benchmark"].get("device"), "benchmark.device", available=True)
        if device.type == "cpu" and tcfg["threads"]:
            torch.set_num_threads(int(tcfg["threads"]))
        self.main = main = dist.is_main
        if main:
            check_run_dir(self.out, resume=bool(self.resume), overwrite=self.overwrite)
        seed_everything(cfg["seed"], dist.rank)
        task = self.task
        task.setup(dist)
        model = task.build_model()
        self.method = method = build_method(cfg["method"], cfg["compress"], tcfg["epochs"])
        model = method.prepare(model)
        self.input_size = task.input_size()
        method.input_size = self.input_size
        self.start_epoch, self.step, self.train_time_before = 0, 0, 0.0
        resume_path = resolve_resume(self.resume, self.out) if self.resume else None
        ckpt = None
        if resume_path is not None:
            ckpt = load_checkpoint(resume_path)
            if not isinstance(ckpt, dict) or "spec" not in ckpt or "model" not in ckpt:
                raise ValueError(f"{resume_path}: not a training checkpoint of edp-det (fields 'spec'/'model' missing)")
            self._check_resumable(ckpt, resume_path)
            method.load_state_dict(ckpt.get("method", {}))
            apply_spec(model, ckpt["spec"])
            model.load_state_dict(ckpt["model"])
            self.start_epoch, self.step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
            self.train_time_before = float(ckpt.get("train_time_s", 0.0))
            logger.info("resumed from %s (epoch %d, step %d)", resume_path, self.start_epoch, self.step)
        model.to(device)
        self.optimizer = build_optimizer(model, tcfg)
        self.use_amp = bool(tcfg["amp"]) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.use_amp and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        method.attach(model, self.optimizer)
        self.model = model
        self.ddp_model = self._wrap(model, dist)
        self.iters_per_epoch = task.iters_per_epoch(dist)
        if tcfg["max_iters_per_epoch"]:
            self.iters_per_epoch = min(self.iters_per_epoch, int(tcfg["max_iters_per_epoch"]))
        method.iters_per_epoch = self.iters_per_epoch
        # every check passed: only now does the run write into its folder
        self.ckpt_mgr = CheckpointManager(self.out, keep_last=tcfg["checkpoint_keep"]) if main else None
        if main:
            start_run_dir(self.out, resume=bool(self.resume), overwrite=self.overwrite)
            dump_config(cfg, self.out / "config.yaml")
            if self.resume:   # the interrupted epoch is trained again (all of them without a checkpoint): its records go
                truncate_metrics_log(self.out / "metrics_log.jsonl", int(ckpt["epoch"]) + 1 if ckpt is not None else 0)
        self.log = MetricsLogger(self.out / "metrics_log.jsonl", enabled=main)
        if ckpt is not None:
            self.log.log({"phase": "resume", "epoch": self.start_epoch + 1, "step": self.step,
                          "checkpoint": str(resume_path)})
        self.tb = open_tensorboard(self.out, enabled=main and bool(tcfg.get("tensorboard")))
        if main:
            logger.info("%s", self._banner())
        self.t_start = time.time()

    def _banner(self) -> str:
        cfg, tcfg, task = self.cfg, self.tcfg, self.task
        sizes = ", ".join(f"{k} {v}" for k, v in task.split_sizes().items())
        classes = list(getattr(task, "classes", []) or [])
        shown = ", ".join(classes[:10]) + (f" ... ({len(classes)})" if len(classes) > 10 else "")
        threads = torch.get_num_threads() if self.device.type == "cpu" else None
        target = cfg["compress"].get("flops_target") if cfg["method"] != "baseline" else None
        lines = [f"run: {cfg['task']} / method {cfg['method']}"
                 + (f", {cfg['compress'].get('scope', 'backbone')} FLOPs target {target:.0%}" if target else ""),
                 f"data: {sizes}; classes: {shown}",
                 f"device: {self.device}" + (f", {threads} threads" if threads else "")
                 + (f", {self.dist.world_size} processes" if self.dist.distributed else ""),
                 f"schedule: {tcfg['epochs']} epochs x {self.iters_per_epoch} iterations, batch {tcfg['batch_size']}"
                 + (f" per process" if self.dist.distributed else "")
                 + (f"; resuming at epoch {self.start_epoch + 1}" if self.start_epoch else ""),
                 f"output: {self.out}"]
        return "\n  ".join(lines)

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of optimizer steps (task loss + method penalty, then the method's step hook)."""
        cfg, tcfg, method, task = self.cfg, self.tcfg, self.method, self.task
        device, model, optimizer, scaler = self.device, self.model, self.optimizer, self.scaler
        seed_everything(cfg["seed"] * 100003 + epoch, self.dist.rank)
        self.ddp_model.train()
        loader = task.train_loader(epoch, self.dist)
        n_iter, epochs = self.iters_per_epoch, tcfg["epochs"]
        bar = progress(loader, total=n_iter, desc=f"epoch {epoch + 1}/{epochs}", enabled=self.main)
        meter = ProgressMeter(n_iter, remaining_after=(epochs - epoch - 1) * n_iter)
        t_epoch, n_done, loss_sum = time.time(), 0, 0.0
        with console_logging_above(bar):
            for it, batch in enumerate(bar):
                if it >= n_iter:
                    break
                lr = lr_at(self.step, n_iter, tcfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with torch.autocast(device_type=device.type, enabled=self.use_amp):
                    loss, parts = task.loss(self.ddp_model, batch, device)
                    extra = method.extra_loss(model, epoch)
                    if extra is not None:
                        loss = loss + extra
                if not torch.isfinite(loss).all():
                    last = self.ckpt_mgr.latest() if self.ckpt_mgr else None
                    raise TrainingError(
                        f"non-finite loss {loss.item()} at epoch {epoch + 1}, iteration {it + 1} "
                        f"({format_metrics({k: float(v) for k, v in parts.items()})}); lr={lr:.3g}. "
                        f"Lower train.lr or increase train.warmup_iters. Last good checkpoint: {last or 'none'}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
                scale_before = scaler.get_scale() if self.use_amp else None
                scaler.step(optimizer)
                scaler.update()
                if not self.use_amp or scaler.get_scale() >= scale_before:   # the step was not skipped
                    method.after_step(model, lr, epoch)
                self.step += 1
                n_done += 1
                loss_value = float(loss.detach())
                loss_sum += loss_value
                terms = {k: float(v) for k, v in parts.items()}
                meter.update(loss_value, terms)
                if self.main and (it % tcfg["log_interval"] == 0 or it + 1 == n_iter):
                    rec = {"epoch": epoch + 1, "iter": it + 1, "step": self.step, "lr": lr, "loss": loss_value,
                           **terms, **method.step_stats()}
                    self.log.log(rec)
                    logger.info("%s", meter.line(epoch + 1, epochs, it + 1, lr))
                    if self.tb is not None:
                        for k, v in {"loss": loss_value, **terms, "lr": lr}.items():
                            self.tb.add_scalar(f"train/{k}", v, self.step)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        if self.main and n_done:
            took = time.time() - t_epoch
            logger.info("epoch %d/%d: %d iterations in %s (%.3f s/it)", epoch + 1, epochs, n_done,
                        format_duration(took), took / n_done)
        return {"epoch": epoch + 1, "phase": "end_epoch", "loss_mean": loss_sum / max(n_done, 1),
                "epoch_time_s": time.time() - t_epoch, "regularized": method.regularizing(epoch)}

    def end_epoch(self, epoch: int, epoch_rec: dict) -> None:
        """After the steps of ``epoch``: compaction, PM, periodic evaluation, checks, log line and checkpoint."""
        tcfg, method, dist = self.tcfg, self.method, self.dist
        if dist.distributed:
            # BatchNorm running statistics drift apart after the last step (DDP broadcasts rank 0's buffers
            # only at the start of a forward): take rank 0's, which the checkpoint holds, so that PM,
            # evaluation and the final model are the same on every rank
            for buf in unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buf, src=0)
        epoch_rec.update(method.epoch_stats(self.model, self.input_size))
        if method.compacts(epoch):
            # groups already exactly zero leave the blocks now (exact): the rest of the regularised phase
            # trains smaller convolutions; the checkpoint below stores the compacted architecture
            comp = method.compact(self.model, self.optimizer)
            if comp is not None and comp.changed:
                self.ddp_model = self._wrap(self.model, dist)
                epoch_rec.update(compacted_columns=comp.removed_columns, compacted_channels=comp.removed_channels,
                                 params_compacted=comp.params_after)
        prune_at = method.prune_epoch
        if dist.distributed:      # one decision for all ranks (each rank's method state should agree; never hang)
            prune_at = broadcast_object(prune_at)
        # at or after: a prune epoch decided from state (e.g. a checkpoint's) may already lie behind the resumed run
        if prune_at is not None and epoch + 1 >= prune_at:
            if self.cfg.get("eval", {}).get("around_pm"):
                epoch_rec.update({f"eval_before_pm_{k}": v for k, v in self.task.evaluate(self.model, self.device)
                                  .items() if isinstance(v, (int, float))})
            self.model, self.optimizer, self.ddp_model = self._prune(self.model, self.optimizer, method,
                                                                     self.input_size, dist, epoch=epoch,
                                                                     device=self.device)
            epoch_rec["pruned"] = True
            if self.cfg.get("eval", {}).get("around_pm"):
                epoch_rec.update({f"eval_after_pm_{k}": v for k, v in self.task.evaluate(self.model, self.device)
                                  .items() if isinstance(v, (int, float))})
        if tcfg["eval_interval"] and (epoch + 1) % tcfg["eval_interval"] == 0 and epoch + 1 < tcfg["epochs"]:
            epoch_rec.update({f"eval_{k}": v for k, v in self.task.evaluate(self.model, self.device).items()
                              if isinstance(v, (int, float))})
        bad = [n for n, p in unwrap_model(self.model).named_parameters() if not torch.isfinite(p).all()]
        if bad:
            last = self.ckpt_mgr.latest() if self.ckpt_mgr else None
            raise TrainingError(f"non-finite parameters after epoch {epoch + 1} (e.g. {bad[:3]}); not "
                                f"checkpointed. Lower train.lr. Last good checkpoint: {last or 'none'}")
        if self.main:
            self.log.log(epoch_rec)
            logger.info("epoch %d/%d %s", epoch + 1, tcfg["epochs"],
                        format_metrics({k: v for k, v in epoch_rec.items() if k not in ("epoch", "phase")}))
            if self.tb is not None:
                for k, v in epoch_rec.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",):
                        self.tb.add_scalar(f"epoch/{k}", v, epoch + 1)
            self.ckpt_mgr.save(self._checkpoint_state(epoch), epoch + 1)
        barrier()

    def finalize(self) -> dict:
        """Save the final model, evaluate it and write metrics.json (main rank)."""
        cfg, task = self.cfg, self.task
        train_time = self._train_time()
        model = unwrap_model(self.model)
        model.eval()
        self.model = model
        metrics = {}
        if self.main:
            meta = {"config": cfg, "classes": list(getattr(task, "classes", []) or []), "method": cfg["method"]}
            save_compressed(model, self.out / "model_final.pt", meta=meta)
            metrics.update(task.evaluate(model, self.device))
            metrics.update(task.summary(model, self.device))
            metrics["train_time_s"] = train_time
            metrics["method"] = cfg["method"]
            atomic_write_text(json.dumps(metrics, indent=2, default=float), self.out / "metrics.json")
            logger.info("final: %s", format_metrics({k: v for k, v in metrics.items()
                                                       if isinstance(v, (int, float))}))
            if self.tb is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(f"final/{k}", v, self.step)
                self.tb.close()
        self.log.close()
        barrier()
        return metrics

    def _prune(self, model, optimizer, method, input_size, dist, epoch=0, device=None):
        root = unwrap_model(model)
        old_names = dict(root.named_parameters())
        old_state = optimizer.state
        n_calib = int(getattr(method, "calibration_batches", 0) or 0)
        if n_calib > 0:   # methods fitting layer responses (ADMM-LRS) see a few training batches first
            batches = itertools.islice(self.task.train_loader(epoch, dist), n_calib)
            method.calibrate(root, batches, device if device is not None else next(root.parameters()).device)
        result = method.prune(root, input_size)
        report = result.report
        n_bn = method.options.bn_recalib_batches
        if n_bn > 0 and batchnorm_layers(root) and not result.function_preserved:
            # the pre-PM running statistics no longer match the pruned convolutions (see edp_det.edp.calibration)
            batches = itertools.islice(self.task.train_loader(epoch, dist), n_bn)
            used = recalibrate_batchnorm(root, batches, device if device is not None else
                                         next(root.parameters()).device, distributed=dist.distributed)
            report["bn_recalibrated_batches"] = used
        new_opt = build_optimizer(root, self.tcfg)
        if result.param_map is not None:
            carried = transfer_optimizer_state(old_state, old_names, root, new_opt,
                                               PMReport(param_map=result.param_map))
            logger.info("PM: optimizer state carried for %d parameters", carried)
        method.attach(root, new_opt)
        if dist.is_main:
            atomic_write_text(json.dumps(report, indent=2, default=float), self.out / "pm_report.json")
            if result.table:
                atomic_write_text(result.table + "\n", self.out / "layers.txt")
                logger.info("PM done:\n%s", result.table.splitlines()[-1])
        return root, new_opt, self._wrap(root, dist)
