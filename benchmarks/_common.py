"""Shared helpers for the benchmark scripts: machine description, side-by-side alternating timing, tables.

Timing protocol (the machine is shared and noisy): every variant is timed in *rounds*; in each round every variant
runs ``iters`` timed iterations (after ``warmup`` untimed ones the first time), in an order rotated from round to
round, and the round's time of a variant is the median of its iterations. Ratios are formed *within a round*
(variant / baseline of the same round) and the reported ratio is the median over rounds, so slow phases caused by
other load hit both sides of a ratio alike.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

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


def time_variants(variants: dict[str, Callable[[], object]], *, rounds: int = 5, iters: int = 3,
                  warmup: int = 1, round_warmup: int = 0) -> dict[str, list[float]]:
    """Run every callable ``warmup`` times, then ``rounds`` rounds of ``iters`` timed calls each, rotating the
    order every round. Returns name -> list of per-round median seconds (one entry per round).

    ``round_warmup``: untimed calls of a variant right before its timed calls in every round. With many small
    models alternating (batch-1 inference), the first call after a switch finds caches and the allocator's free
    lists holding the previous model's data; one warm-up call per round times the steady state a served model
    sees instead."""
    names = list(variants)
    for n in names:
        for _ in range(warmup):
            variants[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            for _ in range(round_warmup):
                variants[n]()
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                variants[n]()
                ts.append(time.perf_counter() - t0)
            out[n].append(statistics.median(ts))
    return out


def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of ``t[name] / t[base]`` (same round)."""
    return {n: statistics.median(t / b for t, b in zip(ts, times[base])) for n, ts in times.items()}


def spread(times: dict[str, list[float]], base: str) -> dict[str, tuple[float, float]]:
    """(min, max) over rounds of the per-round ratio, to show the noise."""
    out = {}
    for n, ts in times.items():
        rs = [t / b for t, b in zip(ts, times[base])]
        out[n] = (min(rs), max(rs))
    return out


def median_ms(ts: list[float]) -> float:
    return 1e3 * statistics.median(ts)


def table(header: list[str], rows: list[list], fmt: str = "{:>12}") -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
