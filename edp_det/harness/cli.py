"""Shared command-line plumbing for tools/: config resolution, the top-level error boundary, the device default,
help layout and JSON output.

Every tool's ``main`` is wrapped by :func:`cli_main` so that bad input ends with one clear line naming the file,
field and value, and exit status 2 (a failed training or export: 1; Ctrl-C: 130) — never a traceback from deep
inside torch. This module imports torch only inside the functions that need it, so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from edp_det.runtime.errors import ConfigError, EDPError, caused_by_interrupt

__all__ = ["add_run_args", "resolve_run_config", "resume_argument", "cli_main", "check_output_dir",
           "check_output_file", "training_run_files", "load_detector", "default_device", "resolve_device",
           "tool_parser", "json_safe", "write_json", "INTERRUPTED_CHECKPOINTS", "INTERRUPTED_ATOMIC",
           "INTERRUPTED_DATASET"]

#: what :func:`cli_main` says after Ctrl-C: for tools that write checkpoints, and for tools whose only output is
#: written atomically (a temp file replaced at the end) so that an interrupt leaves no partial file
INTERRUPTED_CHECKPOINTS = "checkpoints written so far are intact"
INTERRUPTED_ATOMIC = "no partially written file was left"
INTERRUPTED_DATASET = "the dataset folder may be incomplete: generate it again (same arguments, same files)"


def add_run_args(parser, data_help: str = "dataset root (overrides data.root)"):
    parser.add_argument("--config", required=True, help="YAML config (holds only what differs from its _base_)")
    parser.add_argument("--data-root", default=None, help=data_help)
    parser.add_argument("--output-dir", default=None, help="output directory (default: runs/<config name>)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="resume from the latest checkpoint in --output-dir (start fresh if there is none)")
    resume.add_argument("--resume-from", default=None, metavar="PATH",
                        help="resume from this checkpoint file (or the latest in this directory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear the run already in --output-dir (its checkpoints, logs and results) before "
                             "starting")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config with each key's help and exit (builds nothing)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. train.epochs=2)")
    return parser


def resume_argument(args):
    """The ``resume`` argument of :class:`edp_det.train.engine.Trainer` from ``--resume`` / ``--resume-from``."""
    return args.resume_from or ("auto" if args.resume else None)


def resolve_run_config(args, task: str) -> tuple[dict, Path]:
    """The run's config from ``--config``, ``--data-root``, ``--output-dir`` and the overrides; with
    ``--print-config`` it is printed and the tool exits 0."""
    from edp_det.harness.run_config import format_resolved_config, resolve_config

    cfg = resolve_config(args.config, args.overrides, task=task, output_dir=args.output_dir,
                         data_root=args.data_root, strict=True)
    if getattr(args, "print_config", False):
        sys.stdout.write(format_resolved_config(cfg))
        raise SystemExit(0)
    return cfg, Path(cfg["output_dir"])


# argparse destinations that name an output folder; checked by cli_main before the tool runs
_OUTPUT_DIR_ARGS = {"output_dir": "--output-dir", "out": "--out"}


def check_output_dir(path, flag: str = "--output-dir") -> Path:
    """``path`` as a Path; ConfigError (one line naming ``flag``) when it exists and is not a folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a directory; give a folder (new or existing)")
    return p


def training_run_files(folder) -> list[str]:
    """The files in ``folder`` that mark it as a training run's output folder (``config.yaml``,
    ``metrics_log.jsonl``, checkpoints, ``model_final.pt``, ...; see :mod:`edp_det.runtime.rundir`); a
    ``metrics.json`` alone is not one (an evaluation folder holds one too). Empty when there is no run."""
    from edp_det.runtime.rundir import existing_run_files

    return [f for f in existing_run_files(folder) if f != "metrics.json"]


def _same_file(a, b) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)   # hard links
    except OSError:
        return False


def check_output_file(path, flag: str, *, overwrite: bool = False, inputs=()) -> Path:
    """``path`` as a Path, for a result file a tool is about to write; writes nothing. ConfigError (one line naming
    ``flag`` and the path) when it

    * is one of the tool's input files (``inputs``: ``(flag, path)`` pairs; the same resolved file), always;
    * is an existing directory;
    * is a file of the training run in its folder (``metrics.json``, ``model_final.pt``, ... next to the run's
      ``config.yaml`` / ``metrics_log.jsonl`` / checkpoints), always;
    * exists and ``overwrite`` is false (the tool's ``--overwrite``).
    """
    from edp_det.runtime.rundir import RUN_FILES

    p = Path(path)
    for in_flag, src in inputs:
        if src is not None and _same_file(p, src):
            raise ConfigError(f"{flag} {path}: is the {in_flag} file itself; write the result to another file")
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")
    run = training_run_files(p.parent)
    if run and (p.name in RUN_FILES or p.name == "log.txt" or p.name in run):
        raise ConfigError(f"{flag} {path}: is a file of the training run in {p.parent} ({', '.join(run[:3])}); "
                          "write the result to another file")
    if p.exists() and not overwrite:
        raise ConfigError(f"{flag} {path}: exists; pass --overwrite to replace it, or choose another file")
    return p


def load_detector(path, flag: str = "--model"):
    """The detector saved in ``path`` (:func:`edp_det.load_compressed`); ConfigError (one line) when the file is
    missing or holds a model that is not a detector (a ``tools/train_cls.py`` classifier); a TorchScript archive, a
    foreign or a corrupt file fails as ``load_compressed`` (:func:`edp_det.runtime.checkpoint.load_checkpoint`)
    says."""
    import edp_det
    from edp_det.ops.adapter import is_detector

    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: file not found: {path}")
    model = edp_det.load_compressed(path)
    if not is_detector(model):
        name = (getattr(model, "edp_arch", None) or {}).get("name", type(model).__name__)
        raise ConfigError(f"{path}: {flag} is a {name!r} model, not a detector")
    return model


def default_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"`` (the training engine's default)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None, flag: str = "--device"):
    """The torch device a tool runs on: ``name`` validated (:func:`edp_det.runtime.config.check_device`: a device
    this machine has), or :func:`default_device` when None."""
    import torch

    from edp_det.runtime.config import check_device

    if name is None:
        return torch.device(default_device())
    check_device(name, flag, available=True)
    return torch.device(name)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).strip() or type(exc).__name__


def cli_main(fn, args, prog: str, interrupted: str = INTERRUPTED_CHECKPOINTS):
    """The error boundary of every tool: run ``fn(args)`` and return its result, mapping failures to one line on
    stderr and an exit status.

    * bad input (:class:`EDPError`, ``ValueError``, ``TypeError``, ``OSError`` such as a missing file, an output
      folder that is a file): ``<prog>: error: ...``, exit 2 (``EDP_DEBUG=1`` re-raises for a traceback);
    * a failed run (:class:`edp_det.train.engine.TrainingError`, :class:`edp_det.deploy.export.ExportError`):
      ``<prog>: failed: ...``, exit 1;
    * Ctrl-C, also while torch writes a checkpoint (checkpoint writes are atomic: the previous one stays intact):
      ``<prog>: interrupted; <interrupted>``, exit 130. ``interrupted`` says what the tool leaves behind:
      :data:`INTERRUPTED_CHECKPOINTS` (the default) for tools that write checkpoints, :data:`INTERRUPTED_ATOMIC`
      for tools whose results are only written atomically, :data:`INTERRUPTED_DATASET` for the dataset generators.

    Every ``args.output_dir`` / ``args.out`` that exists as a file is refused before ``fn`` runs.
    """
    try:
        for dest, flag in _OUTPUT_DIR_ARGS.items():
            if getattr(args, dest, None) is not None:
                check_output_dir(getattr(args, dest), flag)
        return fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - classified below, anything else propagates unchanged
        if caused_by_interrupt(e):
            print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
            raise SystemExit(130) from None
        if _run_failure(e):
            logging.getLogger(prog).error("%s", e)
            print(f"{prog}: failed: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(1) from None
        if isinstance(e, (EDPError, ValueError, TypeError, OSError)):
            if os.environ.get("EDP_DEBUG"):
                raise
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


def _run_failure(exc: BaseException) -> bool:
    """A training or export run that could not finish (exit 1). Only modules already imported are consulted: an
    error raised before training or export started cannot be one of theirs."""
    kinds = [getattr(sys.modules.get(mod), name, None) for mod, name in
             (("edp_det.train.engine", "TrainingError"), ("edp_det.deploy.export", "ExportError"))]
    return any(k is not None and isinstance(exc, k) for k in kinds)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and examples laid out as written; a non-empty default is appended to the argument help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if all(action.default is not v for v in (None, False, argparse.SUPPRESS)) and not action.required \
                and "%(default)" not in text and (action.option_strings or action.nargs == argparse.OPTIONAL):
            text += " (default: %(default)s)"
        return text


def tool_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of a tool's docstring ``doc`` (whole
    sentences) and whose epilog is the rest (usage examples, notes), both laid out as written."""
    paragraphs = doc.strip().split("\n\n", 1)
    epilog = paragraphs[1] if len(paragraphs) > 1 else None
    return argparse.ArgumentParser(prog=prog, description=paragraphs[0], epilog=epilog, formatter_class=_HelpFormatter)


def json_safe(obj):
    """``obj`` with every NaN / ±inf float replaced by None (strict JSON has no such values)."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path) -> Path:
    """Write ``obj`` as indented strict JSON (NaN/inf as null) to ``path`` atomically; returns the path."""
    from edp_det.runtime.checkpoint import atomic_write_text

    return atomic_write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n", path)
