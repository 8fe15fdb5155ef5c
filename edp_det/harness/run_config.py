"""A run's configuration: resolution (file + overrides + task + output directory), printing and the reference.

:func:`resolve_config` is the one way the tools and the harnesses turn a config file and ``key=value`` overrides
into the config of a run: validated against the task's typed schema with the selected method's ``compress``
options (:func:`edp_det.methods.config_schema`), the method's options checked as the method will read them, the
output directory settled. :func:`format_resolved_config` prints it with each key's help (``--print-config``);
:func:`config_reference` is the Markdown reference of every key, kept in ``docs/CONFIG.md``::

    python -m edp_det.harness.run_config --markdown > docs/CONFIG.md
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from edp_det.methods import build_method, config_schema, method_summaries
from edp_det.runtime.config import check_device, load_config
from edp_det.runtime.errors import ConfigError
from edp_det.runtime.schema import TASKS, format_config, markdown_reference

__all__ = ["resolve_config", "apply_compress_schedule", "check_run_fields", "check_output_dir_outside_data",
           "unused_overrides", "format_resolved_config", "config_reference"]


def resolve_config(config: str | os.PathLike | None, overrides: Iterable[str] = (), *, task: str,
                   output_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                   extra: Mapping | None = None, extra_source: str = "run plan", strict: bool = False) -> dict:
    """The resolved config of one run of ``task``.

    Layers: schema defaults ← ``config`` and its ``_base_`` chain ← ``overrides`` (``data.root`` from ``data_root``
    last among them) ← ``extra`` (a partial config set by a harness, e.g. ``{"method": "slimming"}``; reported as
    ``extra_source``). ``output_dir``: the ``--output-dir`` value; otherwise the config's ``output_dir``, otherwise
    ``runs/<config file stem>``. Raises ConfigError / ValueError (one line naming file, key and value) before
    anything is built. ``strict`` (the tools' command line): an override the run would not use is an error too
    (:func:`unused_overrides`; a harness that passes one set of overrides to runs of several methods is not
    strict).
    """
    if config is not None and not os.path.isfile(config):
        raise ConfigError(f"--config {config}: file not found")
    overrides = list(overrides)
    if data_root:
        overrides.append(f"data.root={data_root}")
    cfg = load_config(config, overrides, schema=config_schema(task),
                      extra_layers=[(extra_source, extra)] if extra else ())
    if cfg["task"] != task:
        raise ConfigError(f"{config}: task={cfg['task']!r} but this tool trains task={task!r}")
    stem = Path(config).stem if config is not None else "run"
    chosen = output_dir or cfg["output_dir"]
    cfg["output_dir"] = str(chosen or Path("runs") / stem)
    if cfg["data"]["root"]:
        cfg["data"]["root"] = str(Path(cfg["data"]["root"]).expanduser())
    apply_compress_schedule(cfg)
    if chosen:
        check_output_dir_outside_data(cfg)
    check_run_fields(cfg)
    build_method(cfg["method"], cfg["compress"], cfg["train"]["epochs"])   # cross-key checks of the method
    if strict:
        unused = unused_overrides(cfg, overrides)
        if unused:
            key, why = unused[0]
            raise ConfigError(f"command line: {key} has no effect in this run ({why}); drop it"
                              + (f" (and {len(unused) - 1} more such key(s))" if len(unused) > 1 else ""))
    return cfg


#: what the compression schedule replaces when it is on: the key it takes the place of → the schedule's key
_SCHEDULE_REPLACES = {"train.epochs": "epochs", "train.lr": "lr", "train.warmup_iters": "warmup_iters",
                      "train.lr_steps": "lr_steps", "compress.epoch_es": "epoch_es"}


def unused_overrides(cfg: Mapping, overrides: Iterable[str]) -> list[tuple[str, str]]:
    """``(key, why)`` of the ``key=value`` overrides that the resolved ``cfg`` leaves without effect: compression
    options of the baseline, a schedule that is off (or the keys it replaces while on), SGD momentum under AdamW, the
    step schedule's keys under cosine, benchmark options without a benchmark, and the latency options that
    target-driven EDP does not read."""
    from edp_det.runtime.config import parse_overrides

    keys = [k for k, _ in parse_overrides([o for o in overrides if not str(o).startswith("data.root=")])]
    c, t = cfg.get("compress") or {}, cfg["train"]
    schedule_on = bool((c.get("schedule") or {}).get("enabled"))
    target_driven = c.get("regularization") == "target" and c.get("flops_target") is not None
    benchmark_on = bool((cfg.get("benchmark") or {}).get("enabled"))
    out = []
    for k in keys:
        why = None
        if cfg["method"] == "baseline" and k.startswith("compress.") and not k.startswith("compress.schedule."):
            why = "method=baseline compresses nothing"
        elif k.startswith("compress.schedule.") and k != "compress.schedule.enabled" and not schedule_on:
            why = "compress.schedule.enabled is false"
        elif schedule_on and k in _SCHEDULE_REPLACES:
            why = f"compress.schedule.enabled=true replaces it: set compress.schedule.{_SCHEDULE_REPLACES[k]}"
        elif k == "train.momentum" and t.get("optimizer") == "adamw":
            why = "train.optimizer=adamw has no momentum option"
        elif k in ("train.lr_steps", "train.lr_gamma") and t.get("lr_schedule") == "cosine":
            why = "train.lr_schedule=cosine"
        elif k.startswith("benchmark.") and k != "benchmark.enabled" and not benchmark_on:
            why = "benchmark.enabled is false"
        elif k.startswith("compress.latency.") and target_driven and c.get("group_weight") != "latency":
            why = "compress.regularization=target reads the latency options only with compress.group_weight=latency"
        if why:
            out.append((k, why))
    return out


def check_output_dir_outside_data(cfg: Mapping) -> None:
    """ConfigError when ``cfg["output_dir"]`` is ``data.root`` or inside it: a run never writes into its dataset."""
    root, out = (cfg.get("data") or {}).get("root"), cfg.get("output_dir")
    if root and out:
        r, o = Path(root).resolve(), Path(out).resolve()
        if o == r or r in o.parents:
            raise ConfigError(f"output directory {out} is inside data.root={root}: a run never writes into its "
                              f"dataset; choose another --output-dir")


def check_run_fields(cfg: Mapping) -> None:
    """Checks between keys, and of values the schema's types cannot express, made before anything is built (a value
    found wrong at the end of training would lose the run): device names, ``model.flops_input_size``, the step
    schedule, one source of initial weights."""
    check_device(cfg.get("device"), "device")
    check_device((cfg.get("benchmark") or {}).get("device"), "benchmark.device")
    steps = list(cfg["train"].get("lr_steps") or [])
    if any(e < 1 for e in steps) or steps != sorted(set(steps)):
        raise ConfigError(f"train.lr_steps={steps} must be increasing epochs ≥ 1")
    m = cfg.get("model", {})
    if m.get("min_size") is not None and m.get("max_size") is not None and m["min_size"] > m["max_size"]:
        raise ConfigError(f"model.min_size={m['min_size']} is larger than model.max_size={m['max_size']}: the "
                          f"detector would resize to another size than the one FLOPs and the PM budget are counted at")
    if any(a < 1 for a in m.get("anchor_sizes") or []):
        raise ConfigError(f"model.anchor_sizes={m['anchor_sizes']}: every anchor size must be ≥ 1 pixel")
    size = m.get("flops_input_size")
    if size is not None and (len(size) != 2 or any(v < 1 for v in size)):
        raise ConfigError(f"model.flops_input_size={size} must be [H, W] with H, W ≥ 1")
    sources = [k for k in ("weights", "weights_backbone", "backbone_checkpoint") if m.get(k)]
    if len(sources) > 1:
        raise ConfigError(f"{' and '.join('model.' + k for k in sources)} are both set: the later would overwrite the "
                          f"earlier's weights; give one (model.weights holds the whole detector, backbone included)")


def apply_compress_schedule(cfg: dict) -> dict:
    """With ``compress.schedule.enabled``: the run trains with the compression schedule (its epochs, Epoch_ES, lr,
    warm-up and lr steps replace ``train.*`` / ``compress.epoch_es``), in place; ConfigError when Epoch_ES leaves no
    epoch to fine-tune. Applying it twice changes nothing (a stored config resolves to itself)."""
    s = cfg["compress"].get("schedule") or {}
    if not s.get("enabled"):
        return cfg
    if not s["epoch_es"] < s["epochs"]:
        raise ConfigError(f"compress.schedule.epoch_es={s['epoch_es']} must be smaller than "
                          f"compress.schedule.epochs={s['epochs']} (at least one fine-tuning epoch after the prune "
                          "point)")
    steps = list(s["lr_steps"] or [])
    if any(not 0 < e < s["epochs"] for e in steps):
        raise ConfigError(f"compress.schedule.lr_steps={steps} must lie in (0, compress.schedule.epochs={s['epochs']})")
    t = cfg["train"]
    t["epochs"], t["warmup_iters"], t["lr_steps"] = s["epochs"], s["warmup_iters"], steps
    if s["lr"] is not None:
        t["lr"] = s["lr"]
    cfg["compress"]["epoch_es"] = s["epoch_es"]
    return cfg


def format_resolved_config(cfg: Mapping) -> str:
    """``cfg`` (as :func:`resolve_config` returns it) as YAML with each key's help in a comment."""
    tree = config_schema(cfg["task"]).tree(cfg["method"])
    return format_config(cfg, tree) + "\n"


def config_reference() -> str:
    """Markdown reference of every config key, per task and per method (the content of docs/CONFIG.md)."""
    return markdown_reference({task: config_schema(task) for task in TASKS}, method_summaries())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edp_det.harness.run_config",
                                description="Print the configuration reference (docs/CONFIG.md).")
    p.add_argument("--markdown", action="store_true", help="print the Markdown reference of every key")
    args = p.parse_args(argv)
    if not args.markdown:
        p.print_help()
        return 2
    sys.stdout.write(config_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
