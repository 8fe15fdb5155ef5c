"""The detection task for the training engine: VOC data, torchvision Faster R-CNN, detection loss, VOC07 mAP,
FLOPs per detector part and FPS/memory figures.

Box format everywhere inside: torchvision continuous xyxy pixels; VOC files / detections: 1-based inclusive.
mAP: ``mAP_voc07`` is the 11-point interpolated VOC2007 AP at IoU > 0.5 (py-faster-rcnn conventions, see
:mod:`edp_det.evaluation.voc_eval`), ``mAP_area`` the all-point (area) variant.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from edp_det.data.transforms import build_transforms
from edp_det.data.voc import VOCDataset, collate_fn
from edp_det.runtime.errors import DataError
from edp_det.ops.adapter import BODY
from edp_det.ops.flops import count_flops, flops_cut
from edp_det.ops.graph import unwrap_model
from edp_det.models import build_model, load_backbone_weights, load_detector_weights

logger = logging.getLogger(__name__)

__all__ = ["DetectionTask", "detector_kwargs"]

_MODEL_KEYS = ("depth", "v2", "norm", "trainable_layers", "min_size", "max_size", "rpn_pre_nms_top_n_train",
               "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
               "rpn_batch_size_per_image", "box_batch_size_per_image", "box_detections_per_img", "box_score_thresh",
               "returned_layers", "fpn_out_channels", "representation_size", "anchor_sizes")


def detector_kwargs(mcfg: dict, num_classes: int) -> dict:
    kw = {k: mcfg[k] for k in _MODEL_KEYS}
    kw["num_classes"] = num_classes
    return kw


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    t = getattr(info.dataset, "transforms", None)
    if t is not None and hasattr(t, "set_random_seed"):
        t.set_random_seed(torch.initial_seed() % 2**31)


class DetectionTask:
    name = "detection"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.classes: list[str] = []
        self.train_set = self.test_set = None

    # ------------------------------------------------------------------ data
    def setup(self, dist) -> None:
        d = self.cfg["data"]
        if not d["root"]:
            raise ValueError("data.root is not set: pass --data-root DIR or data.root=DIR")
        self.dist = dist
        self.train_set = VOCDataset(d["root"], d["train_split"], classes=d["classes"],
                                    use_difficult=d["use_difficult"], on_error=d["on_error"],
                                    transforms=build_transforms(d["augment"], train=True),
                                    image_cache=d["image_cache"])
        self.classes = list(self.train_set.classes)
        self.test_set = VOCDataset(d["root"], d["test_split"], classes=self.classes, use_difficult=True,
                                   on_error=d["on_error"], transforms=None, evaluation=True,
                                   skip_bad_eval_images=d["skip_bad_eval_images"], image_cache=d["image_cache"])
        self._check_splits()

    def _check_splits(self) -> None:
        """The test split must hold something to evaluate (else every AP is undefined, found only after training);
        images in both splits are reported (a test score on training images measures memory, not detection)."""
        d = self.cfg["data"]
        scored = sum(1 for rec in self.test_set.records for o in rec.objects if not o["difficult"])
        if not scored:
            raise DataError(f"{self.test_set.root} split {d['test_split']!r}: object: no object that is not difficult "
                            f"in the {len(self.test_set)} image(s) of the test split: nothing to evaluate (every AP "
                            f"would be undefined); data.test_split names the evaluation split")
        shared = sorted(set(self.train_set.image_ids) & set(self.test_set.image_ids))
        if shared and d["train_split"] != d["test_split"]:
            logger.warning("%d image(s) are in both data.train_split=%r and data.test_split=%r (e.g. %s): the test "
                           "mAP counts images the model trained on", len(shared), d["train_split"], d["test_split"],
                           ", ".join(shared[:5]))
    def split_sizes(self) -> dict[str, int]:
        """Images per split this run reads (for the start banner)."""
        d = self.cfg["data"]
        return {f"train ({d['train_split']})": len(self.train_set), f"test ({d['test_split']})": len(self.test_set)}

    def iters_per_epoch(self, dist) -> int:
        bs = self.cfg["train"]["batch_size"]
        per_rank = -(-len(self.train_set) // dist.world_size)
        return max(1, -(-per_rank // bs))

    def train_loader(self, epoch: int, dist):
        t = self.cfg["train"]
        ds = self.train_set
        if hasattr(ds.transforms, "set_random_seed"):
            ds.transforms.set_random_seed(self.cfg["seed"] * 1009 + epoch)
        if dist.distributed:
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank,
                                                          shuffle=True, seed=self.cfg["seed"])
            sampler.set_epoch(epoch)
            kw = {"sampler": sampler}
        else:
            g = torch.Generator()
            g.manual_seed(self.cfg["seed"] * 7919 + epoch)
            kw = {"shuffle": True, "generator": g}
        return torch.utils.data.DataLoader(ds, batch_size=t["batch_size"], num_workers=t["num_workers"],
                                           collate_fn=collate_fn, worker_init_fn=_worker_init,
                                           persistent_workers=False, **kw)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m = self.cfg["model"]
        if m["name"] != "fasterrcnn":
            raise ValueError(f"model.name={m['name']!r}: the detection task supports 'fasterrcnn'")
        num_classes = len(self.classes) + 1
        model = build_model("fasterrcnn", **detector_kwargs(m, num_classes))
        if m["weights"]:
            load_detector_weights(model, m["weights"])
        if m["weights_backbone"]:
            load_backbone_weights(model, m["weights_backbone"])
        if m["backbone_checkpoint"]:
            from edp_det.train.transfer import check_transfer_config, load_classifier_backbone
            info = load_classifier_backbone(model, m["backbone_checkpoint"])
            check_transfer_config(self.cfg, info, m["backbone_checkpoint"])
        model.classes = list(self.classes)
        return model

    def input_size(self) -> tuple[int, int, int]:
        m = self.cfg["model"]
        hw = m["flops_input_size"] or [m["min_size"], m["min_size"]]
        return (3, int(hw[0]), int(hw[1]))

    # ------------------------------------------------------------------ loss
    def loss(self, model, batch, device):
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    # ------------------------------------------------------------------ eval
    def evaluate(self, model, device) -> dict:
        from edp_det.evaluation.detection import evaluate_detector

        e = self.cfg["eval"]
        res = evaluate_detector(unwrap_model(model), self.test_set, self.classes, device=device,
                                batch_size=e["batch_size"], iou_thresh=e["iou_thresh"], coco=e["coco"])
        logger.info("VOC evaluation:\n%s", res.voc.format_table())
        self.last_detections = res.detections
        return res.metrics

    def original_model(self) -> nn.Module:
        """The uncompressed detector skeleton of this config (for FLOPs ratios)."""
        return build_model("fasterrcnn", **detector_kwargs(self.cfg["model"], len(self.classes) + 1))

    def summary(self, model, device) -> dict:
        """params, FLOPs per part, R_FLOPs/R_params of the backbone vs the original, FPS and peak memory."""
        model = unwrap_model(model)
        size = self.input_size()
        rep = count_flops(model, input_size=size)
        ref = count_flops(self.original_model(), input_size=size)
        body = rep.parts[BODY]
        body0 = ref.parts[BODY]
        out = {"params": rep.params, "params_original": ref.params,
               "params_backbone": body["params"], "flops_backbone": body["flops"],
               "flops_detector": rep.flops, "flops_backbone_original": body0["flops"],
               "flops_detector_original": ref.flops,
               "r_flops_backbone": flops_cut(body0["flops"], body["flops"]),
               "r_params_backbone": 1 - body["params"] / body0["params"],
               "r_flops_detector": flops_cut(ref.flops, rep.flops),
               "flops_parts": rep.parts, "input_size": list(size), "classes": list(self.classes)}
        b = self.cfg["benchmark"]
        bdev = torch.device(b["device"]) if b["device"] else device
        out["device"] = str(bdev)
        if b["enabled"]:
            from edp_det.deploy.benchmark import benchmark_detector
            res = benchmark_detector(model, input_size=size, device=bdev, warmup=b["warmup"], iters=b["iters"],
                                     peak_memory=b["peak_memory"])
            for k in ("fps", "latency_ms", "backbone_fps", "backbone_latency_ms", "peak_memory_mb"):
                if k in res:
                    out[k] = res[k]
            model.to(device)
        return out
