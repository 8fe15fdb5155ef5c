"""Logging set-up for tools, a JSON-lines metrics log, a progress bar wrapper and metric formatting.

Library modules only use ``logging.getLogger(__name__)``; :func:`setup_logging` is for ``tools/`` to call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from edp_det.runtime.errors import DataError

__all__ = ["setup_logging", "MetricsLogger", "read_metrics", "progress", "format_metrics", "format_value",
           "format_duration", "ProgressMeter", "console_logging_above", "open_tensorboard"]

_HANDLER_MARK = "_edp_det_handler"
_FORMAT = "[%(asctime)s %(levelname)s %(name)s]{rank} %(message)s"
_DATEFMT = "%m/%d %H:%M:%S"


def _level(level: int | str) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        value = logging.getLevelName(level.strip().upper())
        if isinstance(value, int):
            return value
    raise ValueError(f"invalid log level {level!r} (use DEBUG, INFO, WARNING, ERROR)")


def setup_logging(output_dir: str | os.PathLike | None = None, rank: int = 0, level: int | str = "INFO") -> logging.Logger:
    """Configure the root logger for a tool (idempotent: replaces handlers installed by an earlier call).

    A stdout handler at ``level`` (WARNING on non-main ranks, whose lines carry ``[rankN]``) and, on the main
    rank with ``output_dir`` given, ``output_dir/log.txt`` (appended). Progress lines are plain log lines, so they
    reach both whether or not stdout is a terminal (nohup, SLURM, ``| tee``). Returns the root logger.
    """
    lvl = _level(level) if rank == 0 else max(_level(level), logging.WARNING)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
            h.close()
    formatter = logging.Formatter(_FORMAT.format(rank="" if rank == 0 else f" [rank{rank}]"), _DATEFMT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt", mode="a", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(formatter)
        h.setLevel(lvl)
        setattr(h, _HANDLER_MARK, True)
        root.addHandler(h)
    root.setLevel(lvl)
    logging.captureWarnings(True)
    return root


# ---------------------------------------------------------------------------------------------- metrics
def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return obj.item()  # torch / numpy scalars
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


class MetricsLogger:
    """Append-only JSON-lines writer: one ``{...}`` per :meth:`log` call, flushed immediately.

    Only the main rank writes (``enabled=None`` → ``is_main_process()`` at construction); elsewhere
    :meth:`log` is a no-op. A ``"time"`` field (Unix seconds) is added unless present.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool | None = None):
        if enabled is None:
            from edp_det.runtime.distributed import is_main_process

            enabled = is_main_process()
        self.path = Path(path)
        self.enabled = bool(enabled)
        self._file = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsLogger({self.path}) is closed")
        data = dict(record or {})
        data.update(fields)
        data.setdefault("time", round(time.time(), 3))
        line = json.dumps(data, default=_jsonable, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines metrics file. A torn last line (crash mid-write) is skipped with a warning;
    a malformed line elsewhere raises :class:`DataError` naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"metrics file not found: {path}") from None
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == len(lines):
                logging.getLogger(__name__).warning("%s: skipping incomplete last line %d", path, i)
                break
            raise DataError(f"{path}, line {i}: malformed metrics record ({exc})") from None
        records.append(rec)
    return records


# --------------------------------------------------------------------------------------------- progress
class _NullProgress:
    """Stands in for tqdm when the bar is disabled: iterates, accepts the same calls, prints nothing."""

    def __init__(self, iterable: Iterable | None, total: int | None):
        self.iterable = iterable
        self.total = total
        self.n = 0

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.n += 1

    def __len__(self) -> int:
        if self.total is not None:
            return self.total
        return len(self.iterable)  # type: ignore[arg-type]

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def write(self, s: str, *args: Any, **kwargs: Any) -> None:
        logging.getLogger(__name__).info("%s", s)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", enabled: bool = True,
             **kwargs: Any):
    """A tqdm bar on stderr, or a silent stand-in with the same interface (``set_postfix``, ``update``, ...).

    The bar shows only when ``enabled``, on the main rank, and when stderr is a terminal (or env
    ``EDP_PROGRESS=1``; ``EDP_PROGRESS=0`` always hides it). Refreshes at most every 0.5 s.
    """
    from edp_det.runtime.distributed import is_main_process

    forced = os.environ.get("EDP_PROGRESS", "").strip()
    show = enabled and is_main_process() and forced != "0" and (forced == "1" or _stderr_is_tty())
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not show:
        return _NullProgress(iterable, total)
    from tqdm import tqdm

    options = {"mininterval": 0.5, "dynamic_ncols": True, "leave": False, "file": sys.stderr, "smoothing": 0.1}
    options.update(kwargs)
    return tqdm(iterable, total=total, desc=desc or None, **options)


# ------------------------------------------------------------------------------------------- formatting
def format_value(v: Any) -> str:
    """Concise text for one metric value: floats with 4 significant digits (``0.001234``, ``1.235e+05``)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", None) == 0:
        v = v.item()
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if v == int(v) and abs(v) < 1e6:
            return f"{v:.1f}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    return str(v)


def format_metrics(d: Mapping[str, Any], sep: str = " ") -> str:
    """``{"loss": 0.12345, "lr": 1e-3, "epoch": 3, "ap": {"50": 0.7}}`` → ``"loss=0.1235 lr=0.001 epoch=3 ap.50=0.7"``."""
    parts = []

    def walk(prefix: str, m: Mapping[str, Any]) -> None:
        for k, v in m.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                walk(key + ".", v)
            else:
                parts.append(f"{key}={format_value(v)}")

    walk("", d)
    return sep.join(parts)


# ------------------------------------------------------------------------------------------- progress lines
def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``d days, h:mm:ss`` past a day) for ETAs and epoch times."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    core = f"{h}:{m:02d}:{s:02d}"
    return f"{days} day{'s' if days > 1 else ''}, {core}" if days else core


class ProgressMeter:
    """Running averages and ETAs for the progress lines the engine logs every ``train.log_interval`` iterations.

    One line reads ``epoch 3/12  iter 40/500  loss 0.6123 (0.6410)  loss_classifier 0.21 (0.23) ...  lr 2.00e-02
    0.531 s/it  eta 0:04:21 (run 1:02:11)``: current value and epoch average per loss term, seconds per iteration
    (average over the epoch so far), and the time left in the epoch and in the whole run at that pace.
    ``remaining_after``: iterations of the run that follow this epoch.
    """

    def __init__(self, iters: int, remaining_after: int = 0, clock=time.monotonic):
        self.iters = int(iters)
        self.remaining_after = int(remaining_after)
        self._clock = clock
        self._t0 = clock()
        self.n = 0
        self.loss = self.loss_sum = 0.0
        self.terms: dict[str, float] = {}
        self.term_sums: dict[str, float] = {}

    def update(self, loss: float, terms: Mapping[str, float] | None = None) -> None:
        self.n += 1
        self.loss = float(loss)
        self.loss_sum += self.loss
        for k, v in (terms or {}).items():
            self.terms[k] = float(v)
            self.term_sums[k] = self.term_sums.get(k, 0.0) + float(v)

    def seconds_per_iter(self) -> float:
        return (self._clock() - self._t0) / self.n if self.n else float("nan")

    def line(self, epoch: int, epochs: int, it: int, lr: float) -> str:
        spi = self.seconds_per_iter()
        left_epoch = max(self.iters - it, 0)
        parts = [f"epoch {epoch}/{epochs}", f"iter {it}/{self.iters}",
                 f"loss {self.loss:.4f} ({self.loss_sum / max(self.n, 1):.4f})"]
        parts += [f"{k} {v:.4f} ({self.term_sums[k] / self.n:.4f})" for k, v in self.terms.items()]
        parts += [f"lr {lr:.2e}", f"{spi:.3f} s/it",
                  f"eta {format_duration(left_epoch * spi)} (run {format_duration((left_epoch + self.remaining_after) * spi)})"]
        return "  ".join(parts)


class console_logging_above:
    """Context manager: while a tqdm ``bar`` is shown, console log lines are written above it (no torn bar);
    with the silent stand-in (no terminal) it does nothing. Log files are never touched."""

    def __init__(self, bar: Any):
        self._cm = None
        if not isinstance(bar, _NullProgress):
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._cm = logging_redirect_tqdm()

    def __enter__(self) -> console_logging_above:
        if self._cm is not None:
            self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


def open_tensorboard(output_dir: str | os.PathLike, enabled: bool):
    """A TensorBoard ``SummaryWriter`` on ``output_dir/tb`` when ``enabled`` (``train.tensorboard``), else None.

    TensorBoard is an optional dependency (``pip install 'edp-det[tensorboard]'``); asking for it without the
    package installed is a :class:`~edp_det.runtime.errors.ConfigError` raised before training starts.
    """
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from edp_det.runtime.errors import ConfigError

        raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                          "pip install 'edp-det[tensorboard]' (or set train.tensorboard=false)") from None
    return SummaryWriter(log_dir=str(Path(output_dir) / "tb"))
