"""The full config schema with default values. YAML files hold only what differs (``_base_`` chains); unknown
keys and wrongly typed values are rejected by :func:`edp_det.runtime.config.load_config` naming file and key."""
from __future__ import annotations

import copy

COMMON = {
    "task": "detection",
    "method": "edp",           # baseline | edp | edp_rank | edp_channel | edp_separate | (comparison methods)
    "seed": 0,
    "output_dir": None,
    "device": None,            # null: cuda if available else cpu
    "train": {
        "epochs": 12,
        "batch_size": 2,       # per process
        "optimizer": "sgd",    # sgd | adamw
        "lr": 0.02,            # for the global batch (batch_size * world_size); not rescaled automatically
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "lr_schedule": "step",  # step | cosine
        "lr_steps": [8, 11],   # epochs at which lr *= lr_gamma (step schedule)
        "lr_gamma": 0.1,
        "warmup_iters": 100,
        "warmup_factor": 0.001,
        "amp": True,           # only takes effect on CUDA
        "grad_clip": None,
        "max_iters_per_epoch": None,
        "log_interval": 20,
        "eval_interval": 0,    # evaluate every N epochs (0: only at the end)
        "checkpoint_keep": 2,
        "num_workers": 2,
        "threads": None,       # torch.set_num_threads on CPU
        "tensorboard": False,  # also write scalars to <output_dir>/tb (needs the tensorboard extra)
    },
    "compress": {
        "scope": "backbone",   # backbone | detector (also FPN + RPN head, low-rank only)
        "lambda_rank": 1e-3,   # λ1
        "lambda_channel": 1e-3,  # λ2
        "epoch_es": 6,         # regularisation early-stopped after this many epochs, then PM
        "flops_target": 0.4,   # R_FLOPs of the scope vs the original network; null = zero groups only
        "round_to": None,
        "rank_layers": "all",  # all | tied: layers whose rank groups the FLOPs-target selection may remove
        "latency_aware": False,  # PM budget: cut layers that are slow per FLOP first (measured at PM time)
        "latency_batch": 1,    # batch size of the latency measurement (serve-time batch)
        "latency_mode": "marginal",  # marginal (time a cut removes, per residual block) | average (dense conv)
        "latency_weights": None,  # JSON {layer: weight} or an earlier run's pm_report.json: reuse, do not measure
        "max_layer_cut": None,  # PM budget: at most this fraction of a layer's live groups (per kind); null = all but one
        "init": "svd",         # svd | identity
        "channel_prune": "auto",
        "forward_mode": "auto",
        "compact": False,      # EDP: after each regularised epoch before ES, remove groups already exactly zero
        "stop_reg_at_target": True,  # EDP: stop the prox once the zero groups alone reach flops_target
        "bn_recalib_batches": 16,  # after PM: re-estimate BatchNorm statistics on this many training batches
        "method_args": {},     # extra per-method options (comparison methods)
    },
    "benchmark": {
        "enabled": True,
        "device": None,        # null: the training device
        "warmup": 3,
        "iters": 10,
        "peak_memory": True,
    },
}

DETECTION = {
    "data": {
        "root": None,
        "train_split": "trainval",
        "test_split": "test",
        "classes": None,       # null: collected from the training split's annotations
        "use_difficult": False,
        "on_error": "raise",   # raise | skip (bad images/boxes of the training split; see skip_bad_eval_images)
        "skip_bad_eval_images": False,  # on_error=skip also drops bad test images (changes the benchmark)
        "image_cache": None,   # image-check verdicts: null = user cache dir, false = off, or a folder
        "augment": {"hflip": 0.5, "scale_jitter": None, "brightness_contrast": 0.0, "hue_saturation": 0.0,
                    "resize": None, "min_visibility": 0.3, "seed": None},
    },
    "model": {
        "name": "fasterrcnn",
        "depth": 50,
        "v2": False,
        "norm": "frozen",      # frozen (pretrained) | bn (from scratch)
        "trainable_layers": 5,
        "min_size": 800,
        "max_size": 1333,
        "weights": None,               # local full-detector checkpoint
        "weights_backbone": None,      # local torchvision ImageNet ResNet checkpoint
        "backbone_checkpoint": None,   # a tools/train_cls.py output (compressed or decomposed ResNet)
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_train": 2000,
        "rpn_post_nms_top_n_test": 1000,
        "rpn_batch_size_per_image": 256,
        "box_batch_size_per_image": 512,
        "box_detections_per_img": 100,
        "box_score_thresh": 0.05,
        "returned_layers": None,       # ResNet stages feeding the FPN; null: [1, 2, 3, 4]
        "fpn_out_channels": 256,
        "representation_size": 1024,   # two-MLP box head width
        "anchor_sizes": None,          # one per FPN level (+ pool level); null: 32, 64, 128, 256, 512
        "flops_input_size": None,      # [H, W] the network input used for FLOPs/FPS; null: [min_size, min_size]
    },
    "eval": {
        "iou_thresh": 0.5,
        "coco": True,
        "batch_size": 1,
    },
}

CLASSIFICATION = {
    "data": {
        "root": None,
        "train_split": "train",
        "val_split": "val",
        "image_size": 224,     # train: RandomResizedCrop(size); val: Resize(size / 0.875) + CenterCrop(size)
        "on_error": "raise",   # raise | skip (bad images of the training split; see skip_bad_eval_images)
        "skip_bad_eval_images": False,  # on_error=skip also drops bad val images (changes the benchmark)
        "check_images": True,  # fully decode every image up front, verdicts cached (first run slow on ImageNet)
        "image_cache": None,   # image-check verdicts: null = user cache dir, false = off, or a folder
    },
    "model": {
        "name": "resnet50",
        "norm": "bn",
        "weights": None,       # local ResNet state_dict (e.g. torchvision); fc re-initialised if the class count differs
    },
    "eval": {
        "batch_size": 64,
    },
}


def defaults_for(task: str) -> dict:
    extra = {"detection": DETECTION, "classification": CLASSIFICATION}.get(task)
    if extra is None:
        raise ValueError(f"task={task!r} is unknown; choose 'detection' or 'classification'")
    out = copy.deepcopy(COMMON)
    out["task"] = task
    out.update(copy.deepcopy(extra))
    return out
