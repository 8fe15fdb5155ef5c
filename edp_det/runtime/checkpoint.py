"""Atomic, plain-data checkpoints.

* :func:`atomic_save` writes ``torch.save`` output to a temp file in the destination directory, flushes and
  fsyncs it, ``os.replace``-s it over the final name and fsyncs the directory: a crash leaves either the
  previous file or the new one, never a partial file under the final name.
* Checkpoints hold plain data only (tensors, dict/OrderedDict, list, str, int, float, bool, None,
  torch.dtype/device/Size): :func:`to_plain` converts tuples, Paths and numpy values, so that
  :func:`load_checkpoint` can always use ``torch.load(..., weights_only=True)`` — nothing is unpickled.
* :class:`CheckpointManager` keeps ``checkpoint_epochNNNN.pt`` files, a ``last_checkpoint`` pointer file
  and rotates old checkpoints; :func:`resolve_resume` turns a ``--resume`` argument into a path.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import shutil
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edp_det.runtime.errors import CheckpointError, WriteError, caused_by_interrupt

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint",
    "is_torchscript_archive",
    "to_plain",
    "CheckpointManager",
    "resolve_resume",
    "LAST_CHECKPOINT_FILE",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT_FILE = "last_checkpoint"
_CKPT_RE = re.compile(r"^checkpoint_epoch(\d{4,})\.pt$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------------- plain data
def to_plain(obj: Any, _where: str = "checkpoint") -> Any:
    """Return ``obj`` converted to data that ``torch.load(weights_only=True)`` accepts.

    tuples → lists (namedtuples → dicts), ``os.PathLike`` → str, numpy scalars → Python scalars,
    numpy arrays → tensors, ``nn.Parameter`` → plain tensor. Dicts stay dicts and OrderedDicts stay
    OrderedDicts (keeping a state dict's ``_metadata``). Anything else (modules, optimizers, custom
    classes, sets, …) raises :class:`TypeError` naming where it was found.
    """
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor:  # nn.Parameter and other subclasses → plain tensor
            return obj.detach().as_subclass(torch.Tensor)
        return obj
    np = sys.modules.get("numpy")  # numpy objects can only exist if numpy is imported
    if np is not None:
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(obj).copy())
        if isinstance(obj, np.generic):
            return obj.item()
    if isinstance(obj, Mapping):
        if isinstance(obj, collections.OrderedDict):
            out: dict = collections.OrderedDict()
            metadata = getattr(obj, "_metadata", None)
            if metadata is not None:
                out._metadata = to_plain(metadata, f"{_where}._metadata")  # type: ignore[attr-defined]
        else:
            out = {}
        for key, value in obj.items():
            pkey = to_plain(key, f"{_where} key {key!r}")
            if isinstance(pkey, (list, torch.Tensor, dict)):
                raise TypeError(f"{_where}: key {key!r} of type {type(key).__name__} cannot be saved in a checkpoint")
            out[pkey] = to_plain(value, f"{_where}.{key}")
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return to_plain(dict(obj._asdict()), _where)
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"{_where}: object of type {type(obj).__module__}.{type(obj).__qualname__} is not plain data "
        "(save its state_dict() / plain values instead)"
    )


# ------------------------------------------------------------------------------------------ atomic I/O
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Create ``path`` atomically: ``write(fileobj)`` fills a temp file, then fsync + os.replace."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, (OSError, RuntimeError)) and not caused_by_interrupt(e):
            raise WriteError(f"{path}: could not be written ({_write_failure(e, directory)}); "
                             f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}") from e
        raise
    _fsync_dir(str(directory))
    return path


def _write_failure(exc: BaseException, directory: Path) -> str:
    """The reason of a failed write in a few words: the OS error, or the free space left when torch's own writer
    failed (it reports a full disk only as an internal "file write failed")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"no space left on the device: {free / 2**20:.1f} MiB free"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first}"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(to_plain(obj))`` to ``path`` atomically; returns the path.

    On any failure the previous file at ``path`` (if any) is untouched and no temp file is left.
    """
    plain = to_plain(obj)
    return _atomic_write(path, lambda f: torch.save(plain, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file atomically (same protocol as :func:`atomic_save`)."""
    data = text.encode("utf-8")
    return _atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------- load
# torch words its refusal of a pickled class/function "Unsupported global: GLOBAL x.y ..." or, for modules it never
# allows (os, sys, ...), "Trying to load unsupported GLOBAL x.y whose module x is blocked"
_UNSUPPORTED_GLOBAL_RE = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.I)
_SAFE_DATA = "only tensors and plain values (dict, list, str, int, float, bool, None) are loaded, nothing is unpickled"


def _header(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _refusal_detail(text: str) -> str:
    """The reason in torch's weights-only refusal, without its preamble, its advice and its documentation link."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if m:
        return _without_advice(" ".join(m.group(1).split()))
    for para in re.split(r"\n\s*\n", text.strip()):
        para = " ".join(para.split())
        if para and not para.startswith(("Weights only load failed", "Check the documentation")):
            return _without_advice(para)
    return ""


def _without_advice(text: str) -> str:
    """``text`` cut before torch's advice on how to load the file anyway (allow-listing globals or
    ``weights_only=False``), which would unpickle code from the file."""
    cut = re.split(r"\s*(?:Please use|Re-running|weights_only|add_safe_globals|safe_globals)", text, maxsplit=1)[0]
    return cut.rstrip(" .;,:")


def _describe_failure(path: Path, exc: BaseException) -> str:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else ""
    head = _header(path)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # neither a zip archive nor pickle protocol 2+
        return f"not a torch checkpoint (unrecognised header {head!r})"
    weights_only_refusal = isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text
    match = _UNSUPPORTED_GLOBAL_RE.search(text)
    if weights_only_refusal and match:
        return (
            f"holds pickled Python objects ({match.group(1)}), i.e. code or objects other than tensors; refused "
            f"for safety ({_SAFE_DATA})"
        )
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "truncated or corrupted torch zip archive"
    if not head.startswith(b"PK") and (isinstance(exc, EOFError) or "truncated" in text.lower()
                                       or "ran out of input" in text.lower()):
        return "truncated legacy torch/pickle file"
    if weights_only_refusal:
        detail_text = _refusal_detail(text)
        return (
            f"holds data other than tensors and plain values ({detail_text or type(exc).__name__}); refused for "
            f"safety ({_SAFE_DATA})"
        )
    if head.startswith(b"PK"):
        return f"corrupted torch archive ({type(exc).__name__}: {_without_advice(first)})"
    return f"not a loadable torch checkpoint ({type(exc).__name__}: {first})"


def is_torchscript_archive(path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip holding ``constants.pkl`` and the
    scripted ``code/``), which :func:`load_checkpoint` refuses."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/__torch__/" in n for n in names)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location=..., weights_only=True)`` with one-line :class:`CheckpointError` s.

    Missing file, directory, empty file, a TorchScript archive, not a torch file, truncated archive, or a file
    needing pickled classes → ``CheckpointError("checkpoint <path>: <what is wrong>")``. Nothing is ever unpickled.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, not a file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot stat ({exc})") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: empty file (0 bytes)")
    if is_torchscript_archive(path):
        raise CheckpointError(f"checkpoint {path}: a TorchScript archive (torch.jit.save, e.g. from tools/export.py), "
                              f"not an edp-det model file or checkpoint; give the file it was exported from, or "
                              f"load it with torch.jit.load")
    try:
        with warnings.catch_warnings():  # foreign raw pickles trigger a protocol warning before the error
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except PermissionError as exc:
        raise CheckpointError(f"checkpoint {path}: permission denied ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError/...
        try:
            reason = _describe_failure(path, exc)
        except OSError as io_exc:
            reason = f"unreadable ({io_exc})"
        err = CheckpointError(f"checkpoint {path}: {reason}")
        err.original = exc  # type: ignore[attr-defined]
        raise err from None


# ------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Epoch checkpoints in ``output_dir`` with a ``last_checkpoint`` pointer and rotation.

    ``save(state, epoch)`` writes ``checkpoint_epochNNNN.pt`` (atomically), points ``last_checkpoint`` at
    it (atomically) and deletes older epoch checkpoints beyond ``keep_last`` (never the one just written;
    ``keep_last=None`` keeps all). ``save(state, epoch, tag="best")`` writes ``checkpoint_best.pt``
    instead: tagged files are never rotated and do not move the pointer.
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = 2):
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    @property
    def pointer_file(self) -> Path:
        return self.output_dir / LAST_CHECKPOINT_FILE

    @staticmethod
    def filename(epoch: int, tag: str | None = None) -> str:
        if tag is not None:
            if not isinstance(tag, str) or not _TAG_RE.match(tag):
                raise ValueError(f"invalid checkpoint tag {tag!r} (use letters, digits, '_', '-', '.')")
            return f"checkpoint_{tag}.pt"
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        return f"checkpoint_epoch{epoch:04d}.pt"

    def save(self, state: Any, epoch: int, tag: str | None = None) -> Path:
        """Write ``state`` (``"epoch"`` added to a dict state if absent); return the written path."""
        path = self.output_dir / self.filename(epoch, tag)
        if isinstance(state, Mapping) and "epoch" not in state:
            state = {**state, "epoch": epoch}
        atomic_save(state, path)
        if tag is None:
            atomic_write_text(path.name + "\n", self.pointer_file)
            self._rotate(keep=path)
        logger.info("saved checkpoint %s", path)
        return path

    def checkpoints(self) -> list[Path]:
        """Epoch checkpoints in ``output_dir``, oldest (lowest epoch) first."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for entry in self.output_dir.iterdir():
            m = _CKPT_RE.match(entry.name)
            if m and entry.is_file():
                found.append((int(m.group(1)), entry))
        return [p for _, p in sorted(found)]

    def _rotate(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        others = [p for p in self.checkpoints() if p.name != keep.name]
        stale = others[: max(0, len(others) - (self.keep_last - 1))]
        for p in stale:
            try:
                p.unlink()
                logger.debug("removed old checkpoint %s", p)
            except FileNotFoundError:
                pass

    def latest(self) -> Path | None:
        """Path named by ``last_checkpoint`` if that file exists, else the highest epoch checkpoint, else None."""
        try:
            name = self.pointer_file.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            name = ""
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("cannot read %s (%s); scanning for checkpoints", self.pointer_file, exc)
            name = ""
        if name:
            candidate = Path(name) if os.path.isabs(name) else self.output_dir / name
            if candidate.is_file():
                return candidate
            logger.warning("%s names missing file %s; scanning for checkpoints", self.pointer_file, candidate)
        found = self.checkpoints()
        return found[-1] if found else None

    @staticmethod
    def resolve_resume(arg: Any, output_dir: str | os.PathLike) -> Path | None:
        return resolve_resume(arg, output_dir)


def resolve_resume(arg: Any, output_dir: str | os.PathLike | None) -> Path | None:
    """Turn a ``--resume`` value into a checkpoint path (or None = start fresh).

    * ``None`` / ``False`` / ``""`` → None.
    * ``"auto"`` / ``True`` → latest checkpoint in ``output_dir`` (None if there is none yet).
    * a directory → latest checkpoint in it (CheckpointError if none).
    * a file path → that path (CheckpointError if it does not exist).
    """
    if arg is None or arg is False or (isinstance(arg, str) and not arg.strip()):
        return None
    if arg is True or (isinstance(arg, str) and arg.strip().lower() == "auto"):
        if output_dir is None:
            raise CheckpointError("resume='auto' needs an output directory")
        latest = CheckpointManager(output_dir).latest()
        if latest is None:
            logger.info("resume=auto: no checkpoint in %s, starting fresh", output_dir)
        else:
            logger.info("resume=auto: resuming from %s", latest)
        return latest
    if not isinstance(arg, (str, os.PathLike)):
        raise CheckpointError(f"invalid resume argument {arg!r} (expected a path, 'auto' or None)")
    path = Path(os.path.expanduser(os.fspath(arg)))
    if path.is_dir():
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise CheckpointError(f"resume: no checkpoint found in directory {path}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {path}: file not found")
    return path
