"""The output folder of a training run: what counts as a run in it, and the rules for starting one there.

A run writes ``config.yaml``, ``metrics_log.jsonl``, epoch checkpoints with a ``last_checkpoint`` pointer,
``pm_report.json`` / ``layers.txt``, ``model_final.pt``, ``metrics.json`` and (optionally) TensorBoard events in
``tb/``. Starting a run in a folder that already holds one is refused unless the caller resumes it or asks for the
folder's run files to be cleared first (``overwrite``): two runs never mix their logs, checkpoints and results.
Temporary files left by a killed atomic write (``.<name>.<pid>.<hex>.tmp``) are removed at every start. The check
(:func:`check_run_dir`) comes before anything is built; the folder is written (:func:`start_run_dir`) only once the
run's data, model and checkpoint checks have passed, so a run that fails to start changes nothing there.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from edp_det.runtime.errors import EDPError

__all__ = ["RunDirError", "RUN_FILES", "existing_run_files", "remove_stale_temporaries", "check_run_dir",
           "start_run_dir", "truncate_metrics_log"]

logger = logging.getLogger(__name__)

#: files a training run writes (besides its epoch checkpoints and the ``tb/`` folder)
RUN_FILES = ("config.yaml", "metrics_log.jsonl", "last_checkpoint", "pm_report.json", "layers.txt",
             "model_final.pt", "metrics.json")
_CHECKPOINT_RE = re.compile(r"^checkpoint_[\w.-]+\.pt$")
_TMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
TENSORBOARD_DIR = "tb"


class RunDirError(EDPError, ValueError):
    """The output folder cannot take this run (it holds another one, or it is not a folder)."""


def existing_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names of the run files in ``output_dir`` (sorted; empty when the folder is missing or holds no run)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = {p.name for p in out.iterdir()}
    found = [n for n in RUN_FILES if n in names]
    found += sorted(n for n in names if _CHECKPOINT_RE.match(n))
    if (out / TENSORBOARD_DIR).is_dir():
        found.append(TENSORBOARD_DIR + "/")
    return found


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Delete the temporaries an interrupted atomic write left in ``output_dir``; returns their names."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    removed = []
    for p in out.iterdir():
        if _TMP_RE.match(p.name) and p.is_file():
            try:
                p.unlink()
                removed.append(p.name)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed), out,
                    ", ".join(sorted(removed)))
    return removed


def check_run_dir(output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Whether a run may start in ``output_dir``; writes nothing. Returns the earlier run's files found there.

    * ``output_dir`` is an existing file: :class:`RunDirError`.
    * it holds a run and neither ``resume`` nor ``overwrite`` is set: :class:`RunDirError` naming the run's files and
      the three ways on (``--resume``, another ``--output-dir``, ``--overwrite``).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out}: exists and is not a directory; give a folder (new or existing)")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: resume continues the run, overwrite clears it")
    found = existing_run_files(out)
    if found and not resume and not overwrite:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise RunDirError(f"--output-dir {out} already holds a run ({shown}): pass --resume to continue it, "
                          f"--overwrite to clear it first, or choose another --output-dir")
    return found


def start_run_dir(output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Create ``output_dir`` for a run that passed its start-up checks (call :func:`check_run_dir` first).

    Stale temporaries of interrupted writes are removed. With ``overwrite`` (and no ``resume``) the earlier run's
    files, epoch checkpoints and ``tb/`` are deleted and ``log.txt`` is emptied; other files are left alone.
    """
    out = Path(output_dir)
    found = check_run_dir(out, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    if found and overwrite:
        for name in found:
            p = out / name.rstrip("/")
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        log_txt = out / "log.txt"
        if log_txt.is_file():
            os.truncate(log_txt, 0)
        logger.info("--overwrite: cleared the earlier run in %s (%s)", out, ", ".join(found))
    return out


def truncate_metrics_log(path: str | os.PathLike, last_epoch: int) -> int:
    """Drop the records of epochs after ``last_epoch`` (1-based) from a JSON-lines metrics log, atomically.

    A run resumed from the checkpoint of epoch ``last_epoch`` repeats the epoch that was interrupted; its partial
    records would otherwise appear twice. Lines that are not JSON objects (a line cut by a kill) are dropped too.
    Returns the number of records removed.
    """
    from edp_det.runtime.checkpoint import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(rec, dict):
            dropped += 1
            continue
        epoch = rec.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > last_epoch:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_text("".join(k + "\n" for k in kept), path)
    return dropped
