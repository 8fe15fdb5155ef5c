"""torchrun / DDP helpers that are no-ops in a single process.

``init_distributed()`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by ``torchrun``); without them
(or with ``WORLD_SIZE=1``) it returns a single-process :class:`DistInfo` and initialises nothing. Every
other helper works whether or not a process group exists.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from edp_det.runtime.errors import ConfigError

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "barrier",
    "all_reduce_mean",
    "broadcast_object",
    "all_gather_object",
    "reduce_dict",
    "destroy",
    "seed_everything",
    "param_checksums",
    "check_params_identical",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
) -> DistInfo:
    """Initialise the default process group from torchrun's environment (idempotent).

    ``device``: ``None`` → ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cpu"`` forces CPU.
    ``backend``: ``None`` → ``nccl`` for CUDA devices, ``gloo`` for CPU. ``timeout_s``: collective timeout.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"inconsistent distributed environment: RANK={rank} WORLD_SIZE={world_size}")

    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if world_size == 1:
        return DistInfo(0, 1, 0, dev, False, None)

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE>1 but this torch build has no torch.distributed support")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world_size} but {var} is not set (launch with torchrun)")
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world_size}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl" and dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        logger.info("initialised %s process group: rank %d/%d, local rank %d, %s", backend, rank, world_size,
                    local_rank, dev)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True, dist.get_backend())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo is given CPU tensors."""
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, as a new tensor (input untouched; integer input → float)."""
    out = tensor.detach().clone()
    if not out.is_floating_point() and not out.is_complex():
        out = out.double() if out.dtype == torch.int64 else out.float()
    if not is_distributed():
        return out
    device = out.device
    buf = out.to(_comm_device(out))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return buf.to(device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """List of every rank's ``obj``, indexed by rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_dict(d: Mapping[str, Any]) -> dict[str, float]:
    """Mean over ranks of a dict of scalars (floats, ints, 0-d/1-element tensors) → dict of Python floats.

    All ranks must pass the same keys (checked; a mismatch raises ValueError on every rank).
    """
    keys = sorted(d)
    values = []
    for k in keys:
        v = d[k]
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"reduce_dict: value of {k!r} is a tensor with {v.numel()} elements, expected a scalar")
            v = v.detach().item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"reduce_dict: value of {k!r} is {type(v).__name__}, expected a number")
        values.append(float(v))
    if not is_distributed():
        return dict(zip(keys, values))
    all_keys = all_gather_object(keys)
    if any(ks != keys for ks in all_keys):
        raise ValueError(f"reduce_dict: ranks passed different keys: {all_keys}")
    mean = all_reduce_mean(torch.tensor(values, dtype=torch.float64))
    return dict(zip(keys, mean.tolist()))


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed ``random``, numpy (if installed) and torch (CPU + CUDA) with ``seed + rank``; returns it."""
    effective = int(seed) + int(rank)
    random.seed(effective)
    try:
        import numpy as np

        np.random.seed(effective % (2**32))
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    torch.manual_seed(effective)  # seeds CUDA devices too
    return effective


def param_checksums(model: torch.nn.Module) -> dict[str, tuple[float, float, float]]:
    """Per parameter/buffer name: float64 (sum, sum of squares, position-weighted sum)."""
    out = {}
    with torch.no_grad():
        for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in items:
                x = t.detach().reshape(-1)
                if x.is_complex():
                    x = torch.view_as_real(x).reshape(-1)
                x = x.to(device="cpu", dtype=torch.float64)
                w = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64) if x.numel() else x
                out[f"{kind}:{name}"] = (x.sum().item(), (x * x).sum().item(), (x * w).sum().item())
    return out


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(a, b))  # NaN == NaN here


def check_params_identical(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer has the same float64 checksums on all ranks (DDP sanity check).

    A collective: every rank must call it. Returns True in a single process.
    """
    mine = param_checksums(model)
    if not is_distributed():
        return True
    gathered = all_gather_object(mine)
    ref = gathered[0]
    ok = True
    for r, other in enumerate(gathered[1:], start=1):
        if other.keys() != ref.keys():
            logger.warning("rank %d has different parameter/buffer names than rank 0", r)
            ok = False
            continue
        differing = [k for k in ref if not _same(ref[k], other[k])]
        if differing:
            logger.warning("rank %d differs from rank 0 in %d tensors, e.g. %s", r, len(differing), differing[:3])
            ok = False
    return ok
