"""Shared helpers of the classification tests (test_train_cls / test_transfer).

One tiny classifier run (tools/train_cls.py in-process, configs/tiny_imagefolder.yaml, ResNet-18 at 32 px) is
shared by both modules through a per-process cache: epoch_es=2 of 3 epochs with the fixed λ, so ``checkpoint_epoch0001.pt`` is
decomposed (before PM), ``checkpoint_epoch0002.pt`` pruned, and ``model_final.pt`` compressed.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CLS = REPO_ROOT / "configs" / "tiny_imagefolder.yaml"
# shared by the fixture run and the resume tests: the resumed runs must use the same settings
# (the paper's fixed λ: PM at Epoch_ES whatever the zeros; the target-driven default prunes at the end of the epoch
# in which its target was reached, which is the first epoch here)
CLS_OVERRIDES = ["compress.epoch_es=2", "train.checkpoint_keep=5", "benchmark.enabled=false", "train.threads=1",
                 "compress.regularization=fixed"]

_CACHE: dict[str, Path] = {}


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_tool(name: str, argv: list[str]):
    """``tools/<name>.py argv`` in-process through the same error boundary as ``__main__`` (cli_main); returns
    the exit status (0 on success). Restores the root logger afterwards."""
    from edp_det.harness.cli import cli_main

    mod = load_tool(name)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        cli_main(mod.main, mod.get_args_parser().parse_args(argv), name)
        return 0
    except SystemExit as e:
        return e.code
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        logging.captureWarnings(False)


def make_cls_data(root: Path, train: int = 4, val: int = 2, size: int = 40) -> Path:
    from edp_det.data.imagefolder import make_synthetic_imagefolder

    make_synthetic_imagefolder(root, train, val, image_size=size, seed=0)
    return root


def tiny_cls_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(data_root, output_dir)`` of the shared tiny classifier run (run once per process)."""
    if "out" not in _CACHE:
        data = make_cls_data(tmp_path_factory.mktemp("cls_data"))
        out = tmp_path_factory.mktemp("cls_run")
        rc = run_tool("train_cls", ["--config", str(TINY_CLS), "--data-root", str(data), "--output-dir", str(out),
                                    "--log-level", "WARNING", *CLS_OVERRIDES])
        assert rc == 0, f"train_cls exited {rc}"
        _CACHE.update(data=data, out=out)
    return _CACHE["data"], _CACHE["out"]
