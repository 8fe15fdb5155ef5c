"""Shared command-line plumbing for tools/: config resolution and the top-level error boundary.

Every tool's ``main`` is wrapped by :func:`cli_main` so that bad input ends with one clear line naming the file,
field and value, and exit status 2 (training failures: 1) — never a traceback from deep inside torch.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edp_det.runtime.errors import EDPError

__all__ = ["add_run_args", "resolve_run_config", "resume_argument", "cli_main"]


def add_run_args(parser, data_help: str = "dataset root (overrides data.root)"):
    parser.add_argument("--config", required=True, help="YAML config (holds only what differs from its _base_)")
    parser.add_argument("--data-root", default=None, help=data_help)
    parser.add_argument("--output-dir", default=None, help="output directory (default: runs/<config name>)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="resume from the latest checkpoint in --output-dir (start fresh if there is none)")
    resume.add_argument("--resume-from", default=None, metavar="PATH",
                        help="resume from this checkpoint file (or the latest in this directory)")
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
                         data_root=args.data_root)
    if getattr(args, "print_config", False):
        sys.stdout.write(format_resolved_config(cfg))
        raise SystemExit(0)
    return cfg, Path(cfg["output_dir"])


def cli_main(fn, args, prog: str) -> None:
    """Run ``fn(args)``; map our errors and bad input to one line on stderr and a non-zero exit."""
    from edp_det.train.engine import TrainingError

    try:
        fn(args)
    except TrainingError as e:
        logging.getLogger(prog).error("%s", e)
        print(f"{prog}: training stopped: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (EDPError, ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("EDP_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; checkpoints written so far are intact", file=sys.stderr)
        raise SystemExit(130) from None
