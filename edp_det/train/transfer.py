"""Transfer of a classifier trained by ``tools/train_cls.py`` into a Faster R-CNN's ResNet body.

:func:`load_classifier_backbone` (called by :class:`edp_det.train.detection.DetectionTask` when
``model.backbone_checkpoint`` is set) accepts ``model_final.pt`` (:func:`edp_det.save_compressed` format) or a
training checkpoint (``checkpoint_epochNNNN.pt``), and handles the three states such a classifier can be in:

* ``"compressed"`` — after PM: ``nn.Conv2d`` / ``LowRankConv2d(basis, coeff)`` layers with fewer channels. The body
  is rebuilt around the pruned structure (the classifier's architecture spec applied under the body's name)
  and the weights loaded. Train the detector with ``method: baseline`` (fine-tuning); it cannot be decomposed
  again.
* ``"decomposed"`` — before PM: ``CompressedAwareConv2d`` blocks. The blocks go into the body, so detection
  training continues the EDP schedule (``method.prepare`` sees a decomposed model and does not decompose again;
  PM happens at the detector's ``compress.epoch_es``).
* ``"plain"`` — an uncompressed classifier (e.g. ``method: baseline``): ordinary pretrained weights.

The classifier head (``fc``) is dropped; ResNet stages the body does not hold (``returned_layers`` without 4)
are skipped. Norm layers: a BatchNorm2d classifier into a ``model.norm: bn`` detector keeps BatchNorm2d; into a
``model.norm: frozen`` detector its statistics become FrozenBatchNorm2d (the standard fine-tuning recipe; for a
decomposed classifier the frozen affine maps are folded into the blocks exactly as :func:`edp_det.edp.decompose`
does). A classifier trained with ``norm: frozen`` needs a ``norm: frozen`` detector. The FPN's input channels
are checked against the body's actual output channels (EDP never prunes residual outputs, so they match unless
the depth differs, which is reported first). Parameters of body stages the detector freezes
(``trainable_layers``) stay frozen.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.block import CompressedAwareConv2d
from edp_det.runtime.checkpoint import load_checkpoint
from edp_det.runtime.errors import CheckpointError, ConfigError
from edp_det.ops.adapter import BODY_PREFIX, find_resnet_body
from edp_det.ops.graph import build_channel_graph, get_submodule, set_submodule, unwrap_model
from edp_det.ops.surgery import LowRankConv2d
from edp_det.models import build_model
from edp_det.deploy.serialization import FORMAT, apply_spec, architecture_spec

logger = logging.getLogger(__name__)

__all__ = ["load_classifier_backbone", "read_classifier_file", "check_transfer_config"]

def read_classifier_file(path) -> dict:
    """``{"arch", "spec", "state_dict", "kind"}`` of a train_cls.py output (compressed file or checkpoint).

    ``kind``: ``"decomposed"`` (holds CompressedAwareConv2d blocks), ``"compressed"`` (some layer differs from the
    undecomposed classifier) or ``"plain"``. Raises CheckpointError on anything else.
    """
    obj = load_checkpoint(path)
    what = "model.backbone_checkpoint"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        arch, spec, sd = obj.get("arch"), obj.get("spec"), obj.get("state_dict")
    elif isinstance(obj, dict) and "spec" in obj and "model" in obj:
        arch, spec, sd = obj.get("arch"), obj.get("spec"), obj.get("model")
    else:
        raise CheckpointError(f"{path}: {what} must be a tools/train_cls.py output (model_final.pt or a "
                              "checkpoint_epoch*.pt holding 'spec' and weights); for a plain torchvision ResNet "
                              "state_dict use model.weights_backbone")
    if not (isinstance(arch, dict) and isinstance(spec, dict) and isinstance(sd, dict)):
        raise CheckpointError(f"{path}: {what}: fields 'arch', 'spec' and the state dict must be dicts")
    name = arch.get("name")
    if not isinstance(name, str) or not name.startswith("resnet"):
        raise CheckpointError(f"{path}: {what} holds a {name!r} model, expected a ResNet classifier "
                              "(tools/train_cls.py output); for a detector checkpoint use model.weights")
    if any(d.get("type") == "edp_block" for d in spec.values()):
        kind = "decomposed"
    else:
        ref = architecture_spec(build_model(name, **dict(arch.get("kwargs", {}))))
        kind = "plain" if all(ref.get(k) == d for k, d in spec.items()) and set(ref) == set(spec) else "compressed"
    return {"arch": arch, "spec": spec, "state_dict": sd, "kind": kind}


def _classifier_norm(arch: dict, spec: dict) -> str:
    norm = arch.get("kwargs", {}).get("norm")
    if norm in ("bn", "frozen"):
        return norm
    return "bn" if any(d.get("type") == "batchnorm2d" for d in spec.values()) else "frozen"


def _body_norm(body: nn.Module) -> str:
    return "frozen" if isinstance(body.bn1, FrozenBatchNorm2d) else "bn"


def _depth_of(name: str) -> int | None:
    try:
        return int(name[len("resnet"):])
    except ValueError:
        return None


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, CompressedAwareConv2d):
        return m.out_channels
    if isinstance(m, LowRankConv2d):
        return m.out_channels
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    raise TypeError(f"cannot tell the output channels of a {type(m).__name__}")


def _stage_out_channels(stage: nn.Module) -> int:
    last = stage[-1]
    return _out_channels(last.conv3 if hasattr(last, "conv3") else last.conv2)


def _check_fpn(detector: nn.Module, body: nn.Module, path) -> None:
    fpn = getattr(detector.backbone, "fpn", None)
    if fpn is None or not hasattr(body, "return_layers"):
        return
    layers = sorted(body.return_layers.items(), key=lambda kv: int(kv[1]) if str(kv[1]).isdigit() else 0)
    for i, (lname, _) in enumerate(layers):
        inner = fpn.inner_blocks[i]
        conv = next(m for m in inner.modules() if isinstance(m, nn.Conv2d))
        got = _stage_out_channels(getattr(body, lname))
        if conv.in_channels != got:
            raise CheckpointError(f"{path}: model.backbone_checkpoint: body stage {lname!r} outputs {got} channels "
                                  f"but the FPN expects {conv.in_channels} (residual outputs must not be pruned)")


def _fold_frozen_norms(detector: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d that follows a CompressedAwareConv2d of the body into the block (as
    ``decompose`` does for frozen detectors); the norm becomes Identity and the block owns the channel's affine."""
    from edp_det.edp.decompose import fold_frozen_bn_into_block

    n = 0
    for node in build_channel_graph(detector, scope="backbone"):
        block = get_submodule(detector, node.name)
        if not isinstance(block, CompressedAwareConv2d) or node.norm is None:
            continue
        norm = get_submodule(detector, node.norm)
        if isinstance(norm, FrozenBatchNorm2d):
            fold_frozen_bn_into_block(block, norm)
            set_submodule(detector, node.norm, nn.Identity())
            block.norm_name = None
            n += 1
    return n


def load_classifier_backbone(detector: nn.Module, path) -> dict:
    """Put the ResNet of a train_cls.py output into the detector's ResNet body (see module docstring); in place.

    Returns ``{"kind", "classifier", "skipped"}`` — kind ``"compressed"`` / ``"decomposed"`` / ``"plain"``, the
    classifier's registry name, and top-level body parts of the classifier the body does not hold.
    Raises CheckpointError (bad / foreign file, depth or FPN mismatch) or ConfigError (norm mismatch).
    """
    path = Path(path)
    detector = unwrap_model(detector)
    prefix, body = find_resnet_body(detector)
    if prefix != BODY_PREFIX:
        raise TypeError(f"load_classifier_backbone expects a detector with a ResNet body, got "
                        f"{type(detector).__name__}")
    info = read_classifier_file(path)
    arch, spec, sd, kind = info["arch"], info["spec"], info["state_dict"], info["kind"]
    det_arch = getattr(detector, "edp_arch", None) or {}
    det_depth = det_arch.get("kwargs", {}).get("depth") if det_arch.get("name") == "fasterrcnn" else None
    cls_depth = _depth_of(arch["name"])
    if det_depth is not None and cls_depth is not None and int(det_depth) != cls_depth:
        raise CheckpointError(f"{path}: model.backbone_checkpoint is a {arch['name']} but the detector has "
                              f"model.depth={det_depth}; set model.depth={cls_depth}")
    cls_norm, det_norm = _classifier_norm(arch, spec), _body_norm(body)
    if cls_norm == "frozen" and det_norm == "bn":
        raise ConfigError(f"{path}: model.backbone_checkpoint was trained with norm 'frozen' (no BatchNorm2d to "
                          "carry over); set model.norm: frozen for the detector")
    to_frozen = cls_norm == "bn" and det_norm == "frozen"

    # which body parameters the detector trains (trainable_layers), by top-level body part
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    if "conv1" in trainable:
        trainable.add("bn1")

    body_spec, skipped = {}, set()
    for name, d in spec.items():
        top = name.split(".")[0]
        if top == "fc":
            continue
        if not hasattr(body, top):
            skipped.add(top)
            continue
        d = dict(d)
        if d["type"] == "edp_block" and d.get("norm_name"):
            d["norm_name"] = BODY_PREFIX + d["norm_name"]
        if to_frozen and d["type"] == "batchnorm2d":
            d = {"type": "frozenbn", "num_features": d["num_features"], "eps": d["eps"]}
        body_spec[BODY_PREFIX + name] = d
    body_sd = {k: v for k, v in sd.items() if k.split(".")[0] != "fc" and k.split(".")[0] not in skipped}
    if to_frozen:
        body_sd = {k: v for k, v in body_sd.items() if not k.endswith("num_batches_tracked")}
    try:
        apply_spec(detector, body_spec)
        dtype = next(detector.parameters()).dtype
        body.to(dtype)
        body.load_state_dict(body_sd, strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: model.backbone_checkpoint does not fit the detector body: "
                              f"{str(e).splitlines()[0]}") from None
    for n, p in body.named_parameters():
        p.requires_grad_(n.split(".")[0] in trainable)
    folded = _fold_frozen_norms(detector) if to_frozen and kind == "decomposed" else 0
    _check_fpn(detector, body, path)
    logger.info("backbone from %s: %s %s classifier%s%s", path, kind, arch["name"],
                " (BatchNorm2d -> FrozenBatchNorm2d" + (f", {folded} folded into blocks)" if folded else ")")
                if to_frozen else "", f"; skipped {sorted(skipped)}" if skipped else "")
    return {"kind": kind, "classifier": arch["name"], "skipped": sorted(skipped)}


def check_transfer_config(cfg: dict, info: dict, path) -> None:
    """Reject detector configs that cannot go on from the transferred body (called by DetectionTask).

    * a compressed (pruned) body cannot be decomposed again: only ``method: baseline`` fine-tunes it;
    * a decomposed body continues EDP with ``compress.scope: backbone`` only (the FPN / RPN head are not
      decomposed because ``method.prepare`` skips an already decomposed model);
    * ``model.weights_backbone`` would be overwritten: set one of the two.
    """
    if cfg["model"].get("weights_backbone"):
        raise ConfigError(f"model.backbone_checkpoint={str(path)!r} and model.weights_backbone="
                          f"{cfg['model']['weights_backbone']!r} both set the backbone; set only one")
    method = cfg["method"]
    if info["kind"] == "compressed" and method != "baseline":
        raise ConfigError(f"model.backbone_checkpoint={str(path)!r} is already pruned (after PM) and cannot be "
                          f"compressed again with method={method!r}: fine-tune it with method: baseline, or pass a "
                          "checkpoint from before PM (an epoch before the pruning one: compress.epoch_es with the "
                          "fixed λ, the epoch that reached the target with the target-driven default) to continue "
                          "EDP in the detector")
    if info["kind"] == "decomposed":
        if cfg["compress"]["scope"] != "backbone":
            raise ConfigError(f"model.backbone_checkpoint={str(path)!r} is decomposed; continuing EDP from it "
                              f"supports compress.scope: backbone only (got {cfg['compress']['scope']!r})")
        if method == "baseline":
            logger.warning("model.backbone_checkpoint=%s is decomposed but method=baseline never prunes: the "
                           "detector will train (and be saved) with the decomposed blocks", path)
