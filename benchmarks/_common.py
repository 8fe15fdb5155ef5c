"""Shared helpers for the benchmark scripts: machine description and text tables.

Timing follows :func:`edp_det.deploy.timing.time_alternating` (alternating rounds with the order rotated every
round, warm-up, per-round medians; ratios formed within a round, median over rounds).
"""
from __future__ import annotations

import os
import platform

import torch


def machine_info() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"nproc={os.cpu_count()} cpu='{cpu}' torch={torch.__version__} threads={torch.get_num_threads()} "
            f"python={platform.python_version()}")


def table(header: list[str], rows: list[list], fmt: str = "{:>12}") -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
