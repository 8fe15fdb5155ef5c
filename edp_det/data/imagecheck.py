"""Up-front image checks: every image is fully decoded once before training, the verdict is cached.

:func:`check_images` decodes each file completely (``Image.open`` + ``Image.load``; ``Image.verify``
alone accepts truncated JPEGs), on a pool of threads (Pillow releases the GIL while decoding, so the
threads use all cores without the start-up and pickling cost of processes). A bar shows progress on a
terminal; otherwise one summary line is logged.

Cache: the verdict of each file is stored in a small JSON file keyed by its absolute path, byte size
and modification time (ns), so a rerun or a resume decodes only files that are new or changed. Where
the file lives (:func:`image_cache_file`): ``cache=None`` uses the user cache folder
(``$EDP_DET_CACHE_DIR``, else ``$XDG_CACHE_HOME/edp_det``, else ``~/.cache/edp_det``), one file per
dataset root, so datasets on read-only storage are never written to and every run on the same data
shares the verdicts; ``cache=<folder>`` uses that folder; ``cache=False`` disables caching.

EXIF orientation: :class:`ImageInfo` records the stored (raw) frame size and the EXIF orientation tag;
:attr:`ImageInfo.display_size` is the size after applying the orientation, i.e. the size of the image
:func:`edp_det.data.voc.load_image` returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

from edp_det.runtime.errors import ConfigError
from edp_det.runtime.logs import progress

logger = logging.getLogger(__name__)

__all__ = [
    "EXIF_ORIENTATION_TAG",
    "TRANSPOSING_ORIENTATIONS",
    "ImageCheckReport",
    "ImageInfo",
    "check_images",
    "decode_image",
    "default_cache_dir",
    "image_cache_file",
]

#: EXIF tag number of ``Orientation``.
EXIF_ORIENTATION_TAG = 0x0112

#: EXIF orientations that swap width and height when applied (rotations by 90/270 degrees, transposes).
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageInfo:
    """Verdict on one image file: ``ok`` (fully decodable), the stored frame ``width`` x ``height``,
    the EXIF ``orientation`` (1 when absent) and, when not ``ok``, the decoder's ``error``."""

    ok: bool
    width: int = 0
    height: int = 0
    orientation: int = 1
    error: str | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        """``(width, height)`` after applying the EXIF orientation (the size the loader returns)."""
        if self.orientation in TRANSPOSING_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height

    def to_list(self) -> list:
        return [self.ok, self.width, self.height, self.orientation, self.error]

    @classmethod
    def from_list(cls, v) -> ImageInfo:
        ok, w, h, o, err = v
        return cls(bool(ok), int(w), int(h), int(o), None if err is None else str(err))


def decode_image(path: str | os.PathLike) -> ImageInfo:
    """Open and fully decode one image; never raises (a failure is returned as ``ok=False``)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
            except Exception:  # a broken EXIF block does not stop the loader (exif_transpose ignores it)
                orientation = 1
            im.load()
        return ImageInfo(True, int(w), int(h), orientation if 1 <= orientation <= 8 else 1)
    except Exception as e:  # OSError (truncated), SyntaxError, ValueError, DecompressionBombError, ...
        return ImageInfo(False, error=f"{type(e).__name__}: {e}")


def default_cache_dir() -> Path:
    """``$EDP_DET_CACHE_DIR``, else ``$XDG_CACHE_HOME/edp_det``, else ``~/.cache/edp_det``."""
    env = os.environ.get("EDP_DET_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edp_det"


def image_cache_file(dataset_root: str | os.PathLike, cache: str | os.PathLike | bool | None = None) -> Path | None:
    """The JSON cache file of the image verdicts of ``dataset_root`` (None when ``cache`` is False).

    ``cache=None`` (or True): :func:`default_cache_dir`; a path: that folder. The file name holds the
    dataset folder's name and a hash of its absolute path.
    """
    if cache is False:
        return None
    if not (cache is None or cache is True or isinstance(cache, (str, os.PathLike))):
        raise ConfigError(f"image_cache={cache!r}: expected null (user cache folder), false (no cache) or a folder")
    folder = default_cache_dir() if cache is None or cache is True else Path(cache).expanduser()
    root = os.path.abspath(os.fspath(dataset_root))
    digest = hashlib.sha1(root.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(root).name) or "root"
    return folder / "image_checks" / f"{name}-{digest}.json"


@dataclass
class ImageCheckReport:
    """Result of :func:`check_images`: ``infos`` maps each given path (as ``str``) to its
    :class:`ImageInfo`; ``decoded`` files were decoded now, ``cached`` came from the cache."""

    infos: dict[str, ImageInfo] = field(default_factory=dict)
    decoded: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def bad(self) -> dict[str, ImageInfo]:
        return {p: i for p, i in self.infos.items() if not i.ok}


def _stat_key(path: str) -> tuple[str, list[int]] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), [int(st.st_size), int(st.st_mtime_ns)]


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("%s: image check cache unreadable (%s); checking all images again", path, e)
        return {}


def _write_cache(path: Path, entries: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("%s: cannot write the image check cache (%s); the next run checks the images again", path, e)
        try:
            tmp.unlink()
        except OSError:
            pass


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def check_images(
    paths: Iterable[str | os.PathLike],
    cache_file: str | os.PathLike | None = None,
    workers: int | None = None,
    desc: str = "checking images",
    show_progress: bool = True,
) -> ImageCheckReport:
    """Fully decode every file of ``paths`` (those not already known to ``cache_file``) and return
    an :class:`ImageCheckReport`.

    A cached verdict is reused only when the file's absolute path, size and mtime are unchanged.
    ``workers`` threads decode in parallel (default: the usable CPU cores, at most 8). Unreadable
    files are reported in the result, not raised. The cache (when given) is rewritten with the
    verdicts of all files checked now and those it already held.
    """
    t0 = time.perf_counter()
    cache_path = None if cache_file is None else Path(cache_file)
    entries = _read_cache(cache_path)
    report = ImageCheckReport()
    todo: list[tuple[str, tuple[str, list[int]] | None]] = []
    for p in dict.fromkeys(os.fspath(p) for p in paths):
        key = _stat_key(p)
        hit = entries.get(key[0]) if key is not None else None
        if key is not None and isinstance(hit, list) and len(hit) == 2 and hit[0] == key[1]:
            try:
                report.infos[p] = ImageInfo.from_list(hit[1])
                report.cached += 1
                continue
            except (TypeError, ValueError):
                pass
        todo.append((p, key))
    if todo:
        n = workers if workers is not None else _default_workers()
        bar = progress(total=len(todo), desc=desc, enabled=show_progress)
        try:
            if n <= 1 or len(todo) == 1:
                results = []
                for p, _ in todo:
                    results.append(decode_image(p))
                    bar.update()
            else:
                with ThreadPoolExecutor(max_workers=n, thread_name_prefix="edp-imgcheck") as pool:
                    results = []
                    for info in pool.map(decode_image, (p for p, _ in todo)):
                        results.append(info)
                        bar.update()
        finally:
            bar.close()
        for (p, key), info in zip(todo, results):
            report.infos[p] = info
            if key is not None:
                entries[key[0]] = [key[1], info.to_list()]
        report.decoded = len(todo)
        if cache_path is not None:
            _write_cache(cache_path, entries)
    report.seconds = time.perf_counter() - t0
    logger.info("%s: %d image(s): %d decoded in %.1f s, %d from the cache, %d unreadable", desc,
                len(report.infos), report.decoded, report.seconds, report.cached, len(report.bad))
    return report
