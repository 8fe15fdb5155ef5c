"""Shared command-line plumbing for tools/: config resolution and the top-level error boundary.

Every tool's ``main`` is wrapped by :func:`cli_main` so that bad input ends with one clear line naming the file,
field and value, and exit status 2 (training failures: 1) — never a traceback from deep inside torch.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from edp_det.runtime.config import load_config
from edp_det.runtime.defaults import defaults_for
from edp_det.runtime.errors import EDPError

__all__ = ["add_run_args", "resolve_run_config", "cli_main"]


def add_run_args(parser, data_help: str = "dataset root (overrides data.root)"):
    parser.add_argument("--config", required=True, help="YAML config (holds only what differs from its _base_)")
    parser.add_argument("--data-root", default=None, help=data_help)
    parser.add_argument("--output-dir", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--resume", default=None, nargs="?", const="auto",
                        help="resume from a checkpoint file, or the latest in --output-dir ('auto')")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear the run already in --output-dir (its checkpoints, logs and results) before starting")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. train.epochs=2)")
    return parser


def resolve_run_config(args, task: str) -> tuple[dict, Path]:
    if not os.path.isfile(args.config):
        raise ValueError(f"--config {args.config}: file not found")
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = load_config(args.config, overrides, defaults=defaults_for(task))
    if cfg.get("task") != task:
        raise ValueError(f"{args.config}: task={cfg.get('task')!r} but this tool trains task={task!r}")
    out = args.output_dir or cfg.get("output_dir") or str(Path("runs") / Path(args.config).stem)
    cfg["output_dir"] = str(out)
    if cfg["data"]["root"]:
        cfg["data"]["root"] = str(Path(cfg["data"]["root"]).expanduser())
    return cfg, Path(out)


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
