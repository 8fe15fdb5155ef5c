"""The timing protocol shared by every speed measurement: alternating rounds, warm-up, device synchronisation.

:func:`time_alternating` times a set of named callables ("variants") that are compared with each other:

1. **warm-up**: every variant is called ``warmup`` times, untimed, in the given order (lazy initialisation, caches,
   the allocator's first requests are not the variants' steady-state cost);
2. **rounds**: in round ``r`` the variants take turns in the given order rotated by ``r`` positions, so that no
   variant is always first or always right after the same neighbour, and a slow phase of a shared machine (other
   processes, frequency scaling) hits every variant alike. A turn is ``round_warmup`` untimed calls followed by
   ``iters`` timed calls;
3. **samples**: the timed calls are read either one by one (``per_call=True``: ``iters`` samples per round) or as
   one block (``per_call=False``: one sample per round, the block's time divided by ``iters``; for calls so short
   that reading the clock and synchronising the device would weigh on every sample);
4. **synchronisation**: with a CUDA (or MPS) ``device`` the device queue is drained before every clock read, so a
   sample covers the work its calls launched and nothing queued before them.

The result, :class:`Timings`, keeps every sample (seconds) by variant and round and offers the statistics the
callers report: a variant's *round value* (median of its samples in that round), its *median* over round values,
its pooled samples (all rounds, for latency summaries), and ratios between variants formed *within* a round,
median over rounds (a slow phase then cancels out of the ratio).

The clock is a parameter (``time.perf_counter`` by default) so that the protocol itself can be checked with a
deterministic clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping

import torch

__all__ = ["synchronize", "time_alternating", "Timings"]


def synchronize(device) -> None:
    """Wait until ``device`` (a ``torch.device``, a device string, or None for none) has finished its queued work;
    a no-op on the CPU."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


@dataclass(frozen=True)
class Timings:
    """Samples of :func:`time_alternating`: ``samples[name][r]`` = the samples (seconds) of variant ``name`` in
    round ``r`` (``iters`` per round when timed per call, one when timed as a block)."""

    samples: dict[Hashable, list[list[float]]]

    @property
    def names(self) -> list:
        return list(self.samples)

    def round_values(self, name) -> list[float]:
        """One value per round: the median of the variant's samples in that round (seconds)."""
        return [statistics.median(r) for r in self.samples[name]]

    def median(self, name) -> float:
        """The median over rounds of the round values (seconds)."""
        return statistics.median(self.round_values(name))

    def medians(self) -> dict:
        """:meth:`median` of every variant."""
        return {n: self.median(n) for n in self.samples}

    def pooled(self, name) -> list[float]:
        """All samples of a variant, round after round (seconds)."""
        return [s for r in self.samples[name] for s in r]

    def round_ratios(self, name, base) -> list[float]:
        """Per round: round value of ``name`` / round value of ``base`` in the same round."""
        return [t / b for t, b in zip(self.round_values(name), self.round_values(base))]

    def ratios(self, base) -> dict:
        """Every variant's time relative to ``base``: median over rounds of the same-round ratio."""
        return {n: statistics.median(self.round_ratios(n, base)) for n in self.samples}

    def ratio_ranges(self, base) -> dict:
        """(min, max) over rounds of every variant's same-round ratio to ``base``: how noisy the machine was."""
        out = {}
        for n in self.samples:
            rs = self.round_ratios(n, base)
            out[n] = (min(rs), max(rs))
        return out


def _count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def time_alternating(variants: Mapping[Hashable, Callable[[], object]], *, rounds: int, iters: int,
                     warmup: int = 1, round_warmup: int = 0, per_call: bool = True, device=None,
                     clock: Callable[[], float] = time.perf_counter) -> Timings:
    """Time the callables of ``variants`` (name -> zero-argument callable) by the protocol of this module.

    Args:
        rounds: alternating rounds (>= 1); every variant gets one turn per round, the order rotated each round.
        iters: timed calls per turn (>= 1).
        warmup: untimed calls of every variant before the first round.
        round_warmup: untimed calls of a variant right before its timed calls in every turn (with many models
            alternating, the first call after a switch finds caches holding the previous model's data).
        per_call: one sample per timed call (True) or one per turn, the turn's time / ``iters`` (False).
        device: synchronise this device before every clock read (None: no synchronisation).
        clock: seconds as a float; ``time.perf_counter`` by default.
    Returns:
        a :class:`Timings` with the samples of every variant.
    """
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("variants must be a non-empty mapping name -> callable")
    for n, fn in variants.items():
        if not callable(fn):
            raise ValueError(f"variant {n!r} is not callable: {type(fn).__name__}")
    _count("rounds", rounds, 1)
    _count("iters", iters, 1)
    _count("warmup", warmup, 0)
    _count("round_warmup", round_warmup, 0)
    names = list(variants)
    for n in names:
        for _ in range(warmup):
            variants[n]()
    samples: dict = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            fn = variants[n]
            for _ in range(round_warmup):
                fn()
            if per_call:
                turn = []
                for _ in range(iters):
                    synchronize(device)
                    t0 = clock()
                    fn()
                    synchronize(device)
                    turn.append(clock() - t0)
            else:
                synchronize(device)
                t0 = clock()
                for _ in range(iters):
                    fn()
                synchronize(device)
                turn = [(clock() - t0) / iters]
            samples[n].append(turn)
    return Timings(samples)
