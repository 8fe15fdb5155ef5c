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
from edp_det.runtime.config import dump_config
from edp_det.runtime.distributed import barrier, init_distributed, seed_everything
from edp_det.runtime.errors import EDPError
from edp_det.ops.graph import unwrap_model
from edp_det.runtime.logs import MetricsLogger, format_metrics, progress
from edp_det.methods import build_method
from edp_det.models import describe_model
from edp_det.edp.pruning import transfer_optimizer_state
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
    """Runs one training job. ``task`` implements the task protocol (see :mod:`edp_det.train.detection`)."""

    def __init__(self, cfg: dict, task, output_dir, resume=None):
        self.cfg = cfg
        self.task = task
        self.out = Path(output_dir)
        self.resume = resume
        self.tcfg = cfg["train"]

    # ------------------------------------------------------------------ helpers
    def _device(self, dist) -> torch.device:
        want = self.cfg["device"]
        if dist.distributed:
            return dist.device
        if want:
            if str(want).startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"device={want!r} requested but CUDA is not available")
            return torch.device(want)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _wrap(self, model, dist):
        if not dist.distributed:
            return model
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    def _checkpoint_state(self, model, optimizer, scaler, method, epoch, step) -> dict:
        root = unwrap_model(model)
        return {"model": {k: v.detach().cpu() for k, v in root.state_dict().items()},
                "spec": architecture_spec(root), "arch": describe_model(root),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "method": method.state_dict(), "epoch": epoch, "global_step": step, "config": self.cfg,
                "classes": list(getattr(self.task, "classes", []) or [])}

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg, tcfg = self.cfg, self.tcfg
        dist = init_distributed()
        device = self._device(dist)
        if device.type == "cpu" and tcfg["threads"]:
            torch.set_num_threads(int(tcfg["threads"]))
        main = dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        seed_everything(cfg["seed"], dist.rank)
        task = self.task
        task.setup(dist)
        model = task.build_model()
        method = build_method(cfg["method"], cfg["compress"], tcfg["epochs"])
        model = method.prepare(model)
        input_size = task.input_size()
        method.input_size = input_size
        ckpt_mgr = CheckpointManager(self.out, keep_last=tcfg["checkpoint_keep"]) if main else None
        start_epoch, step = 0, 0
        resume_path = resolve_resume(self.resume, self.out) if self.resume else None
        ckpt = None
        if resume_path is not None:
            ckpt = load_checkpoint(resume_path)
            if not isinstance(ckpt, dict) or "spec" not in ckpt or "model" not in ckpt:
                raise ValueError(f"{resume_path}: not a training checkpoint of edp-det (fields 'spec'/'model' missing)")
            method.load_state_dict(ckpt.get("method", {}))
            apply_spec(model, ckpt["spec"])
            model.load_state_dict(ckpt["model"])
            start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
            logger.info("resumed from %s (epoch %d, step %d)", resume_path, start_epoch, step)
        model.to(device)
        optimizer = build_optimizer(model, tcfg)
        use_amp = bool(tcfg["amp"]) and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            if use_amp and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        method.attach(model, optimizer)
        ddp_model = self._wrap(model, dist)
        log = MetricsLogger(self.out / "metrics_log.jsonl", enabled=main)
        iters_per_epoch = task.iters_per_epoch(dist)
        if tcfg["max_iters_per_epoch"]:
            iters_per_epoch = min(iters_per_epoch, int(tcfg["max_iters_per_epoch"]))
        t_start = time.time()
        for epoch in range(start_epoch, tcfg["epochs"]):
            seed_everything(cfg["seed"] * 100003 + epoch, dist.rank)
            ddp_model.train()
            loader = task.train_loader(epoch, dist)
            bar = progress(loader, total=iters_per_epoch, desc=f"epoch {epoch + 1}/{tcfg['epochs']}", enabled=main)
            t_epoch, n_done, loss_sum = time.time(), 0, 0.0
            for it, batch in enumerate(bar):
                if it >= iters_per_epoch:
                    break
                lr = lr_at(step, iters_per_epoch, tcfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with torch.autocast(device_type=device.type, enabled=use_amp):
                    loss, parts = task.loss(ddp_model, batch, device)
                    extra = method.extra_loss(model, epoch)
                    if extra is not None:
                        loss = loss + extra
                if not torch.isfinite(loss).all():
                    last = ckpt_mgr.latest() if ckpt_mgr else None
                    raise TrainingError(
                        f"non-finite loss {loss.item()} at epoch {epoch + 1}, iteration {it + 1} "
                        f"({format_metrics({k: float(v) for k, v in parts.items()})}); lr={lr:.3g}. "
                        f"Lower train.lr or increase train.warmup_iters. Last good checkpoint: {last or 'none'}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
                scale_before = scaler.get_scale() if use_amp else None
                scaler.step(optimizer)
                scaler.update()
                if not use_amp or scaler.get_scale() >= scale_before:   # the step was not skipped
                    method.after_step(model, lr, epoch)
                step += 1
                n_done += 1
                loss_sum += float(loss.detach())
                if main and (it % tcfg["log_interval"] == 0 or it + 1 == iters_per_epoch):
                    rec = {"epoch": epoch + 1, "iter": it + 1, "step": step, "lr": lr, "loss": float(loss.detach()),
                           **{k: float(v) for k, v in parts.items()}}
                    log.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}")
            if dist.distributed:
                # BatchNorm running statistics drift apart after the last step (DDP broadcasts rank 0's buffers
                # only at the start of a forward): take rank 0's, which the checkpoint holds, so that PM,
                # evaluation and the final model are the same on every rank
                for buf in unwrap_model(model).buffers():
                    torch.distributed.broadcast(buf, src=0)
            epoch_rec = {"epoch": epoch + 1, "phase": "end_epoch", "loss_mean": loss_sum / max(n_done, 1),
                         "epoch_time_s": time.time() - t_epoch, "regularized": method.regularizing(epoch)}
            epoch_rec.update(method.epoch_stats(model, input_size))
            if method.compacts(epoch):
                # groups already exactly zero leave the blocks now (exact): the rest of the regularised phase
                # trains smaller convolutions; the checkpoint below stores the compacted architecture
                comp = method.compact(model, optimizer)
                if comp is not None and comp.changed:
                    ddp_model = self._wrap(model, dist)
                    epoch_rec.update(compacted_columns=comp.removed_columns, compacted_channels=comp.removed_channels,
                                     params_compacted=comp.params_after)
            if method.prune_epoch is not None and epoch + 1 == method.prune_epoch:
                model, optimizer, ddp_model = self._prune(model, optimizer, method, input_size, dist,
                                                          epoch=epoch, device=device)
                epoch_rec["pruned"] = True
            if tcfg["eval_interval"] and (epoch + 1) % tcfg["eval_interval"] == 0 and epoch + 1 < tcfg["epochs"]:
                epoch_rec.update({f"eval_{k}": v for k, v in task.evaluate(model, device).items()
                                  if isinstance(v, (int, float))})
            bad = [n for n, p in unwrap_model(model).named_parameters() if not torch.isfinite(p).all()]
            if bad:
                last = ckpt_mgr.latest() if ckpt_mgr else None
                raise TrainingError(f"non-finite parameters after epoch {epoch + 1} (e.g. {bad[:3]}); not "
                                    f"checkpointed. Lower train.lr. Last good checkpoint: {last or 'none'}")
            if main:
                log.log(epoch_rec)
                logger.info("epoch %d/%d %s", epoch + 1, tcfg["epochs"],
                            format_metrics({k: v for k, v in epoch_rec.items() if k not in ("epoch", "phase")}))
                ckpt_mgr.save(self._checkpoint_state(model, optimizer, scaler, method, epoch, step), epoch + 1)
            barrier()
        train_time = time.time() - t_start
        # ---------------------------------------------------------------- final
        model = unwrap_model(model)
        model.eval()
        self.model = model
        metrics = {}
        if main:
            meta = {"config": cfg, "classes": list(getattr(task, "classes", []) or []), "method": cfg["method"]}
            save_compressed(model, self.out / "model_final.pt", meta=meta)
            metrics.update(task.evaluate(model, device))
            metrics.update(task.summary(model, device))
            metrics["train_time_s"] = train_time
            metrics["method"] = cfg["method"]
            atomic_write_text(json.dumps(metrics, indent=2, default=float), self.out / "metrics.json")
            logger.info("final: %s", format_metrics({k: v for k, v in metrics.items()
                                                       if isinstance(v, (int, float))}))
        log.close()
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
        report = method.prune(root, input_size)
        n_bn = method.options.bn_recalib_batches
        if n_bn > 0 and batchnorm_layers(root):
            # the pre-PM running statistics no longer match the pruned convolutions (see edp_det.edp.calibration)
            batches = itertools.islice(self.task.train_loader(epoch, dist), n_bn)
            used = recalibrate_batchnorm(root, batches, device if device is not None else
                                         next(root.parameters()).device, distributed=dist.distributed)
            report["bn_recalibrated_batches"] = used
        new_opt = build_optimizer(root, self.tcfg)
        param_map = report.pop("param_map", None)
        if param_map is not None:
            from edp_det.edp.pruning import PMReport
            carried = transfer_optimizer_state(old_state, old_names, root, new_opt, PMReport(param_map=param_map))
            logger.info("PM: optimizer state carried for %d parameters", carried)
        method.attach(root, new_opt)
        if dist.is_main:
            table = report.pop("table", None)
            atomic_write_text(json.dumps(report, indent=2, default=float), self.out / "pm_report.json")
            if table:
                atomic_write_text(table + "\n", self.out / "layers.txt")
                logger.info("PM done:\n%s", table.splitlines()[-1])
        return root, new_opt, self._wrap(root, dist)
