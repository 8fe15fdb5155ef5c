"""Top-k classification accuracy.

Ties are broken deterministically: a sample counts as correct at k when its target's *rank* is < k, where
``rank = #{classes with a strictly larger logit} + #{classes with an equal logit and a smaller index}``
(i.e. the order of a stable descending sort). ``k`` is clipped to the number of classes C.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["topk_accuracy", "topk_correct", "AccuracyMeter"]


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [N, C], got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets: expected shape [{logits.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected integer class indices, got dtype {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        bad = targets[(targets < 0) | (targets >= logits.shape[1])][0].item()
        raise ValueError(f"targets: class index {bad} out of range [0, {logits.shape[1]})")


def _ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each sample's target class (0 = best) with ties broken by smaller class index first."""
    t = targets.long()
    tl = logits.gather(1, t[:, None])  # [N, 1]
    idx = torch.arange(logits.shape[1], device=logits.device)[None, :]
    greater = (logits > tl).sum(1)
    tied_before = ((logits == tl) & (idx < t[:, None])).sum(1)
    return greater + tied_before


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is within the top-k, for each k (k clipped to C)."""
    _check(logits, targets)
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks: every k must be >= 1, got {ks}")
    with torch.no_grad():
        r = _ranks(logits.detach(), targets.detach())
        return {k: int((r < min(k, logits.shape[1])).sum()) for k in ks}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies as fractions: ``{"top1": ..., "top5": ...}`` (keys ``f"top{k}"`` for the requested ks).

    An empty batch gives NaN (accuracy undefined).
    """
    correct = topk_correct(logits, targets, ks)
    n = logits.shape[0]
    return {f"top{k}": (c / n if n else math.nan) for k, c in correct.items()}


class AccuracyMeter:
    """Streaming top-k accuracy: ``update(logits, targets)`` per batch, ``compute()`` at the end.

    ``state()`` / ``load_state()`` expose the integer counts ``[n, correct_k...]`` as a tensor, e.g. to ``all_reduce``
    them across processes before ``compute()``.
    """

    def __init__(self, ks: Iterable[int] = (1, 5)):
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks: expected a non-empty list of k >= 1, got {self.ks}")
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.correct = {k: 0 for k in self.ks}

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        for k, c in topk_correct(logits, targets, self.ks).items():
            self.correct[k] += c
        self.n += int(logits.shape[0])

    def compute(self) -> dict[str, float]:
        return {f"top{k}": (self.correct[k] / self.n if self.n else math.nan) for k in self.ks}

    def state(self) -> torch.Tensor:
        return torch.tensor([self.n] + [self.correct[k] for k in self.ks], dtype=torch.int64)

    def load_state(self, state: torch.Tensor) -> None:
        vals = [int(v) for v in state.tolist()]
        if len(vals) != 1 + len(self.ks):
            raise ValueError(f"state: expected {1 + len(self.ks)} counts, got {len(vals)}")
        self.n = vals[0]
        self.correct = dict(zip(self.ks, vals[1:]))
