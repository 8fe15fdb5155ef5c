"""Compression methods behind one interface (:class:`CompressionMethod`), selected by ``method:`` in the config."""
from __future__ import annotations

from .base import CompressionMethod
from .edp import EDPChannelMethod, EDPMethod, EDPRankMethod, EDPSeparateMethod

METHODS: dict[str, type[CompressionMethod]] = {
    "baseline": CompressionMethod,
    "edp": EDPMethod,
    "edp_rank": EDPRankMethod,
    "edp_channel": EDPChannelMethod,
    "edp_separate": EDPSeparateMethod,
}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, compress_cfg: dict, total_epochs: int) -> CompressionMethod:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name](compress_cfg, total_epochs)


__all__ = ["CompressionMethod", "METHODS", "register_method", "build_method"]
