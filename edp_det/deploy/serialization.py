"""Compact, pickle-free model files: an architecture spec (qualified name → module type and shape) beside a plain
``state_dict``, like timm's pruned-model files.

File content (a dict of plain types and tensors; loads with ``torch.load(weights_only=True)``)::

    {"format": "edp-det/compressed", "version": 1,
     "arch":  {"name": "fasterrcnn", "kwargs": {...}},        # registry builder of the unpruned skeleton
     "spec":  {"layer1.0.conv1": {"type": "conv2d", "in": 64, "out": 23, "kernel": [1, 1], ...},
               "layer1.0.conv2": {"type": "lowrank", ...}, ...},     # a detector's: prefixed by its body
     "state_dict": {...}, "meta": {...}}

Spec types: ``conv2d``, ``lowrank`` (:class:`~edp_det.ops.surgery.LowRankConv2d`, state-dict keys
``basis.weight``, ``coeff.weight``, ``coeff.bias``), ``edp_block``, ``batchnorm2d``, ``frozenbn``,
``linear``, ``identity`` and, for the comparison methods (:mod:`edp_det.ops.layers`), ``masked_conv2d`` (its bool
``mask`` travels in the state dict), ``lowrank_sparse`` (basis + coeff + masked sparse conv) and ``fixedstat_bn``.

``load_compressed`` builds the skeleton from the registry, replaces every module named in the spec by a fresh
module of the recorded shape, and loads the state dict strictly, so the result is bit-identical to what was saved.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from edp_det.ops.block import CompressedAwareConv2d
from edp_det.ops.graph import set_submodule, unwrap_model
from edp_det.ops.layers import FixedStatBatchNorm2d, LowRankSparseConv2d, MaskedConv2d
from edp_det.ops.surgery import LowRankConv2d, is_lowrank_pair
from edp_det.models import arch_differences, build_model, describe_model, infer_arch

__all__ = ["save_compressed", "load_compressed", "architecture_spec", "apply_spec", "check_rebuild", "FORMAT"]

FORMAT = "edp-det/compressed"
VERSION = 1


def _conv_spec(m: nn.Conv2d) -> dict:
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TypeError("only groups=1, zero-padded convolutions with integer padding can be saved")
    return {"in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size), "stride": list(m.stride),
            "padding": list(m.padding), "dilation": list(m.dilation), "bias": m.bias is not None}


def architecture_spec(model: nn.Module) -> dict:
    """name → module description for every conv, low-rank pair, EDP block, norm and linear layer of ``model``."""
    spec: dict[str, dict] = {}
    skip_prefixes: list[str] = []
    for name, m in unwrap_model(model).named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(m, CompressedAwareConv2d):
            spec[name] = {"type": "edp_block", "in": m.in_channels, "rank": m.rank, "out": m.out_channels,
                          "kernel": list(m.kernel_size), "stride": list(m.basis.stride),
                          "padding": list(m.basis.padding), "dilation": list(m.basis.dilation),
                          "bias": m.coeff.bias is not None, "orig_in": m.orig_in_channels,
                          "orig_out": m.orig_out_channels, "channel_prunable": m.channel_prunable,
                          "norm_name": m.norm_name, "forward_mode": m.forward_mode}
            skip_prefixes.append(name + ".")
        elif is_lowrank_pair(m):
            spec[name] = {"type": "lowrank", "basis": _conv_spec(m.basis), "coeff": _conv_spec(m.coeff)}
            skip_prefixes.append(name + ".")
        elif isinstance(m, LowRankSparseConv2d):
            spec[name] = {"type": "lowrank_sparse", "basis": _conv_spec(m.basis), "coeff": _conv_spec(m.coeff),
                          "sparse": _conv_spec(m.sparse)}
            skip_prefixes.append(name + ".")
        elif isinstance(m, MaskedConv2d):   # before nn.Conv2d (a subclass); the mask is a state_dict buffer
            spec[name] = {"type": "masked_conv2d", **_conv_spec(m)}
        elif isinstance(m, nn.Conv2d):
            spec[name] = {"type": "conv2d", **_conv_spec(m)}
        elif isinstance(m, FixedStatBatchNorm2d):   # before nn.BatchNorm2d (a subclass)
            spec[name] = {"type": "fixedstat_bn", "num_features": m.num_features, "eps": m.eps}
        elif isinstance(m, nn.BatchNorm2d):
            spec[name] = {"type": "batchnorm2d", "num_features": m.num_features, "eps": m.eps,
                          "momentum": m.momentum, "affine": m.affine, "track": m.track_running_stats}
        elif isinstance(m, FrozenBatchNorm2d):
            spec[name] = {"type": "frozenbn", "num_features": m.weight.numel(), "eps": m.eps}
        elif isinstance(m, nn.Linear):
            spec[name] = {"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
        elif isinstance(m, nn.Identity) and name:
            spec[name] = {"type": "identity"}
    return spec


def _make_conv(d: dict) -> nn.Conv2d:
    return nn.Conv2d(d["in"], d["out"], tuple(d["kernel"]), stride=tuple(d["stride"]), padding=tuple(d["padding"]),
                     dilation=tuple(d["dilation"]), bias=d["bias"])


def _build(d: dict) -> nn.Module:
    t = d["type"]
    if t == "conv2d":
        return _make_conv(d)
    if t == "lowrank":
        return LowRankConv2d(_make_conv(d["basis"]), _make_conv(d["coeff"]))
    if t == "masked_conv2d":
        return MaskedConv2d(d["in"], d["out"], tuple(d["kernel"]), stride=tuple(d["stride"]),
                            padding=tuple(d["padding"]), dilation=tuple(d["dilation"]), bias=d["bias"])
    if t == "lowrank_sparse":
        b, c = d["basis"], d["coeff"]
        return LowRankSparseConv2d(b["in"], c["out"], b["out"], tuple(b["kernel"]), tuple(b["stride"]),
                                   tuple(b["padding"]), tuple(b["dilation"]), bias=c["bias"])
    if t == "fixedstat_bn":
        return FixedStatBatchNorm2d(d["num_features"], eps=d["eps"])
    if t == "edp_block":
        b = CompressedAwareConv2d(d["in"], d["out"], d["rank"], tuple(d["kernel"]), tuple(d["stride"]),
                                  tuple(d["padding"]), tuple(d["dilation"]), bias=d["bias"],
                                  orig_in_channels=d["orig_in"], orig_out_channels=d["orig_out"],
                                  channel_prunable=d["channel_prunable"], forward_mode=d["forward_mode"])
        b.norm_name = d["norm_name"]
        return b
    if t == "batchnorm2d":
        return nn.BatchNorm2d(d["num_features"], eps=d["eps"], momentum=d["momentum"], affine=d["affine"],
                              track_running_stats=d["track"])
    if t == "frozenbn":
        return FrozenBatchNorm2d(d["num_features"], eps=d["eps"])
    if t == "linear":
        return nn.Linear(d["in"], d["out"], bias=d["bias"])
    if t == "identity":
        return nn.Identity()
    raise ValueError(f"unknown module type {t!r} in architecture spec")


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Replace every module named in ``spec`` (parents before children) by a fresh module of that shape."""
    for name in sorted(spec, key=lambda n: n.count(".")):
        set_submodule(model, name, _build(spec[name]))
    return model


def check_rebuild(model: nn.Module, arch: dict, spec: dict) -> None:
    """Raise ValueError unless ``build_model(**arch)`` with ``spec`` applied has exactly the state-dict keys and
    shapes of ``model`` and (for models :func:`~edp_det.models.infer_arch` can read) the same settings. The
    skeleton is built on the meta device: nothing is allocated or initialised."""
    try:
        with torch.device("meta"):
            skeleton = apply_spec(build_model(arch["name"], **arch["kwargs"]), spec)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"arch {arch['name']!r} cannot rebuild this model: {str(e).splitlines()[0]}") from None
    mine, theirs = model.state_dict(), skeleton.state_dict()
    problems = [f"{k} missing from the rebuild" for k in mine if k not in theirs]
    problems += [f"{k} not in the model" for k in theirs if k not in mine]
    problems += [f"{k} has shape {tuple(mine[k].shape)} in the model, {tuple(theirs[k].shape)} in the rebuild"
                 for k in mine if k in theirs and mine[k].shape != theirs[k].shape]
    try:
        model_arch = infer_arch(model)
    except ValueError:   # a registered builder's own variant: the structure check above is what can be checked
        model_arch = None
    if model_arch is not None and model_arch["name"] == arch["name"] and not problems:
        problems += [f"setting {d} (rebuild vs model)" for d in arch_differences(infer_arch(skeleton), model_arch)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"arch {arch['name']!r} {arch['kwargs']} would not rebuild this model: "
                         + "; ".join(problems[:3]) + more)


def save_compressed(model: nn.Module, path, *, arch: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``model`` (decomposed, pruned or plain) as arch + spec + state_dict, atomically.

    ``arch``: ``{"name", "kwargs"}`` of the registry builder, or the keyword dict alone. Not needed for models made
    by :func:`edp_det.build_model`, torchvision ResNet classifiers and torchvision ResNet-FPN Faster R-CNNs (v1 and
    v2): their settings are read from the model (:func:`edp_det.models.describe_model`); a given ``arch`` is
    completed from the model, and a field that contradicts it raises ValueError. Before writing, the rebuild is
    checked against the model (:func:`check_rebuild`), so a file that would load as a different model is never
    written. ``meta``: extra plain data (e.g. the resolved config, metrics).
    """
    from edp_det.runtime.checkpoint import atomic_save

    root = unwrap_model(model)
    arch = describe_model(root, arch)
    spec = architecture_spec(root)
    check_rebuild(root, arch, spec)
    payload = {"format": FORMAT, "version": VERSION, "arch": arch, "spec": spec,
               "state_dict": {k: v.detach().cpu() for k, v in root.state_dict().items()},
               "meta": dict(meta or {})}
    if getattr(root, "classes", None) is not None and "classes" not in payload["meta"]:
        payload["meta"]["classes"] = list(root.classes)
    path = Path(path)
    atomic_save(payload, path)
    return path


def _fail(path, msg):
    raise ValueError(f"{path}: {msg}")


def load_compressed(path, map_location="cpu", return_meta: bool = False):
    """Rebuild a model written by :func:`save_compressed` (bit-exact). Raises ValueError on a corrupt or foreign
    file. With ``return_meta=True`` returns ``(model, meta)``."""
    from edp_det.runtime.checkpoint import load_checkpoint

    obj = load_checkpoint(path, map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        _fail(path, f"not an edp-det compressed model file (field 'format' = "
                    f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r})")
    if obj.get("version") != VERSION:
        _fail(path, f"unsupported version {obj.get('version')!r} (expected {VERSION})")
    for key, typ in (("arch", dict), ("spec", dict), ("state_dict", dict)):
        if not isinstance(obj.get(key), typ):
            _fail(path, f"field {key!r} missing or not a {typ.__name__}")
    arch = obj["arch"]
    if not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs"), dict):
        _fail(path, f"field 'arch' must hold 'name' and 'kwargs', got {arch!r}")
    try:
        model = build_model(arch["name"], **arch["kwargs"])
        apply_spec(model, obj["spec"])
        dtypes = {v.dtype for v in obj["state_dict"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        model.load_state_dict(obj["state_dict"], strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        _fail(path, f"cannot rebuild the model: {str(e).splitlines()[0]}")
    model.edp_arch = {"name": arch["name"], "kwargs": dict(arch["kwargs"])}
    meta = obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {}
    if isinstance(meta.get("classes"), list):
        model.classes = list(meta["classes"])
    model.eval()
    return (model, meta) if return_meta else model
