"""Compression methods behind one interface (:class:`CompressionMethod`), selected by ``method:`` in the config."""
from __future__ import annotations

from edp_det.methods.base import CompressionMethod, PruneResult
from edp_det.methods.admm_lrs import ADMMLRSMethod
from edp_det.methods.edp import EDPChannelMethod, EDPMethod, EDPRankMethod, EDPSeparateMethod
from edp_det.methods.l1_filter import L1FilterMethod
from edp_det.methods.lrs import LRSMethod
from edp_det.methods.slimming import SlimmingMethod
from edp_det.methods.svd import SVDMethod
from edp_det.runtime.schema import ConfigSchema

METHODS: dict[str, type[CompressionMethod]] = {
    "baseline": CompressionMethod,
    "edp": EDPMethod,
    "edp_rank": EDPRankMethod,
    "edp_channel": EDPChannelMethod,
    "edp_separate": EDPSeparateMethod,
    # comparison methods (same harness: train → prune at compress.epoch_es to compress.flops_target → fine-tune)
    "l1_filter": L1FilterMethod,
    "slimming": SlimmingMethod,
    "svd": SVDMethod,
    "lrs": LRSMethod,
    "admm_lrs": ADMMLRSMethod,
}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, compress_cfg: dict, total_epochs: int) -> CompressionMethod:
    """The method ``name`` with its options read from ``compress_cfg`` (checked against its options class)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name](compress_cfg, total_epochs)


def config_schema(task: str) -> ConfigSchema:
    """The typed config schema of ``task`` with the ``compress`` options of every registered method."""
    return ConfigSchema(task, {name: cls.Options for name, cls in METHODS.items()}, default_method="edp")


def method_summaries() -> dict[str, str]:
    """Method name → its one-line summary."""
    return {name: cls.summary for name, cls in METHODS.items()}


__all__ = ["CompressionMethod", "PruneResult", "METHODS", "register_method", "build_method", "config_schema", "method_summaries"]
