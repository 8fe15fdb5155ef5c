"""The classification task for the training engine: ImageFolder data, torchvision ResNets from the registry,
cross-entropy loss, top-1/top-5 accuracy and FLOPs/params against the undecomposed network.

It implements the task protocol of :class:`edp_det.train.engine.Trainer` (see :mod:`edp_det.train.detection`); everything
else — decomposition, proximal steps, early stop, PM, resume, DDP, AMP, checkpoints, ``metrics.json`` — is the
engine's. Layout: ``root/<train_split>/<class>/*.JPEG`` and ``root/<val_split>/<class>/*.JPEG`` (ImageNet's val
images must be sorted into class folders, as for torchvision's reference scripts); labels follow the sorted class
folders of the train split.

Accuracy: ``top1``/``top5`` are fractions over the whole val split (k clipped to the number of classes). The
engine calls :meth:`ClassificationTask.evaluate` on the main process only at the end (and on every process for
``train.eval_interval``), so evaluation runs the full val split on the calling process without collectives.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from edp_det.data.imagefolder import build_imagefolder
from edp_det.runtime.errors import ConfigError
from edp_det.evaluation.classification import AccuracyMeter
from edp_det.ops.flops import count_flops, flops_cut
from edp_det.ops.graph import unwrap_model
from edp_det.models import MODEL_REGISTRY, build_model

logger = logging.getLogger(__name__)

__all__ = ["ClassificationTask", "load_classifier_weights"]


def load_classifier_weights(model: nn.Module, path) -> list[str]:
    """Load a local ResNet classifier checkpoint (a state_dict, or a dict holding one under ``model`` /
    ``state_dict``) into ``model``. A classifier head of another class count is dropped (``fc`` keeps its fresh
    initialisation, logged); any other shape mismatch or foreign key raises a ValueError naming the key.
    Returns the keys of ``model`` that the file did not provide."""
    from edp_det.models import read_state_dict

    sd = read_state_dict(path, "model.weights")
    own = model.state_dict()
    fc_keys = [k for k in sd if k.startswith("fc.")]
    if any(k in own and own[k].shape != sd[k].shape for k in fc_keys):
        logger.warning("%s: class count differs (fc %s vs %s); fc re-initialised", path,
                       tuple(sd["fc.weight"].shape) if "fc.weight" in sd else "?", tuple(own["fc.weight"].shape))
        sd = {k: v for k, v in sd.items() if k not in fc_keys}
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"{path}: model.weights key {k!r} is not in the model (different architecture, or "
                             "a decomposed/compressed file? those are not accepted as model.weights)")
        if own[k].shape != v.shape:
            raise ValueError(f"{path}: model.weights key {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)} (different ResNet depth?)")
    missing, _ = model.load_state_dict(sd, strict=False)
    logger.info("loaded classifier weights from %s (%d missing keys)", path, len(missing))
    return list(missing)


class ClassificationTask:
    name = "classification"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.classes: list[str] = []
        self.train_set = self.val_set = None

    # ------------------------------------------------------------------ data
    def setup(self, dist) -> None:
        d = self.cfg["data"]
        if not d["root"]:
            raise ConfigError("data.root is not set: pass --data-root DIR or data.root=DIR")
        size = d["image_size"]
        self.dist = dist
        kw = dict(image_size=size, on_error=d["on_error"], check_images=d["check_images"], image_cache=d["image_cache"])
        self.train_set = build_imagefolder(d["root"], d["train_split"], train=True, **kw)
        self.classes = list(self.train_set.classes)
        self.val_set = build_imagefolder(d["root"], d["val_split"], train=False, evaluation=True,
                                         skip_bad_eval_images=d["skip_bad_eval_images"], **kw)
        if len(self.train_set) == 0:
            raise ConfigError(f"{d['root']}/{d['train_split']}: no usable training images")
        logger.info("classification data: %d classes, %d train / %d val images", len(self.classes),
                    len(self.train_set), len(self.val_set))

    def _per_rank(self, dist) -> int:
        return -(-len(self.train_set) // dist.world_size)

    def split_sizes(self) -> dict[str, int]:
        """Images per split this run reads (for the start banner)."""
        d = self.cfg["data"]
        return {f"train ({d['train_split']})": len(self.train_set), f"val ({d['val_split']})": len(self.val_set)}

    def iters_per_epoch(self, dist) -> int:
        bs = self.cfg["train"]["batch_size"]
        per_rank = self._per_rank(dist)
        # drop_last when a full batch exists: a trailing batch of 1 breaks BatchNorm on 1x1 feature maps
        return per_rank // bs if per_rank >= bs else 1

    def train_loader(self, epoch: int, dist):
        """Deterministic per ``(seed, epoch)``: the shuffle (and the workers' base seed) come from a generator /
        sampler seeded by the epoch; random crops/flips in the main process use the RNG the engine reseeds at
        every epoch start."""
        t = self.cfg["train"]
        ds = self.train_set
        g = torch.Generator()
        g.manual_seed(self.cfg["seed"] * 7919 + epoch)
        if dist.distributed:
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank,
                                                          shuffle=True, seed=self.cfg["seed"])
            sampler.set_epoch(epoch)
            kw = {"sampler": sampler}
        else:
            kw = {"shuffle": True}
        drop_last = self._per_rank(dist) >= t["batch_size"]
        return torch.utils.data.DataLoader(ds, batch_size=t["batch_size"], num_workers=t["num_workers"],
                                           generator=g, drop_last=drop_last, persistent_workers=False,
                                           pin_memory=torch.cuda.is_available(), **kw)

    # ------------------------------------------------------------------ model
    def _arch_kwargs(self) -> tuple[str, dict]:
        m = self.cfg["model"]
        if m["name"] not in MODEL_REGISTRY or not m["name"].startswith("resnet"):
            known = sorted(n for n in MODEL_REGISTRY if n.startswith("resnet"))
            raise ConfigError(f"model.name={m['name']!r}: the classification task supports {known}")
        return m["name"], {"num_classes": len(self.classes), "norm": m["norm"]}

    def build_model(self) -> nn.Module:
        name, kw = self._arch_kwargs()
        model = build_model(name, **kw)
        if self.cfg["model"]["weights"]:
            load_classifier_weights(model, self.cfg["model"]["weights"])
        model.classes = list(self.classes)
        return model

    def original_model(self) -> nn.Module:
        """The undecomposed classifier of this config (for FLOPs/params ratios)."""
        name, kw = self._arch_kwargs()
        return build_model(name, **kw)

    def input_size(self) -> tuple[int, int, int]:
        s = int(self.cfg["data"]["image_size"])
        return (3, s, s)

    # ------------------------------------------------------------------ loss
    def loss(self, model, batch, device):
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            acc1 = (logits.argmax(1) == targets).float().mean()
        return loss, {"loss_ce": loss.detach(), "acc1": acc1}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model, device) -> dict:
        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.cfg["eval"]["batch_size"], shuffle=False,
                                             num_workers=self.cfg["train"]["num_workers"])
        meter = AccuracyMeter((1, 5))
        loss_sum = 0.0
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            meter.update(logits, targets)
        model.train(was_training)
        out = meter.compute()
        out["val_loss"] = loss_sum / meter.n if meter.n else float("nan")
        out["val_images"] = meter.n
        logger.info("val: top1 %.4f top5 %.4f (%d images)", out["top1"], out["top5"], meter.n)
        return out

    def summary(self, model, device) -> dict:
        """params, FLOPs and R_params/R_FLOPs against the undecomposed network of the same config."""
        model = unwrap_model(model)
        size = self.input_size()
        rep = count_flops(model, input_size=size)
        ref = count_flops(self.original_model(), input_size=size)
        out = {"params": rep.params, "flops": rep.flops, "params_original": ref.params, "flops_original": ref.flops,
               "r_params": 1 - rep.params / ref.params, "r_flops": flops_cut(ref.flops, rep.flops),
               "input_size": list(size), "num_classes": len(self.classes)}
        b = self.cfg["benchmark"]
        if b["enabled"]:
            from edp_det.deploy.benchmark import measure_latency

            bdev = torch.device(b["device"]) if b["device"] else device
            dtype = next(model.parameters()).dtype
            x = torch.zeros((1, *size), device=bdev, dtype=dtype)
            model.to(bdev).eval()
            with torch.no_grad():
                res = measure_latency(lambda: model(x), warmup=b["warmup"], iters=b["iters"], device=bdev)
            out.update({"device": str(bdev), "latency_ms": res["median_ms"], "fps": res["fps"]})
            model.to(device)
        return out
