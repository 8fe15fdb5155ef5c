"""Same-harness comparison of compression methods on one detector, data set and schedule, over seeds, and its report.

:func:`plan_grid` lays out the runs: every ``method × flops_target`` (the baseline once) per seed, in
``<out>/<method>_<target>/seed<k>/`` (without seeds: ``<out>/<method>_<target>/``, the config's seed). With the
trained-start protocol (``start="trained"``) each seed's baseline trains with ``train.*`` first; every compressed run
and a ``control`` run (the baseline trained on without compression) start from its ``model_final.pt`` with
``compress.schedule``. :func:`run_comparison` trains what is not finished with the one engine
(:class:`edp_det.train.engine.Trainer` + :class:`edp_det.train.detection.DetectionTask`), in this process or ``jobs``
subprocesses of ``tools/train_det.py`` at once: a run whose ``metrics.json`` exists is skipped, an interrupted one
resumes from its latest checkpoint, a failed one is recorded and the others go on. ``<out>/grid.json`` holds the
grid's config hash, the reproducibility record and every run's status and wall time. :func:`build_report` reads the
finished runs back and writes ``<out>/report.md`` with

* mean ± standard deviation over seeds per (method, target) and the paired differences to EDP and to the control
  (or baseline) with 95 % t intervals (:mod:`edp_det.harness.stats`), one sentence per target;
* the Table-XII-style table of every run (:func:`edp_det.harness.report.comparison_rows` /
  :func:`format_comparison_table`), FPS measured side by side (:func:`edp_det.deploy.benchmark.compare_side_by_side`,
  cached in ``bench.json``) when ``benchmark.enabled``, else the per-run figures of ``metrics.json``;
* ``fig4_map_vs_flops.png`` — mAP vs backbone FLOPs cut, one curve per method, error bars over seeds (Fig. 4);
* ``fig5_layers_<target>.png`` — per-layer live output channels and ranks of EDP, Slimming and SVD of one seed
  (Fig. 5, from each run's ``pm_report.json``);
* ``fig3_sparsity.png`` — sparse ratio of params and FLOPs per epoch during regularised training with the ES epoch
  marked (Fig. 3, from the ``end_epoch`` records of ``metrics_log.jsonl``), one seed;
* the reproducibility record (command, config hash, package versions, machine, wall time per run).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edp_det.ops.adapter import short_body_name
from edp_det.harness.run_config import check_output_dir_outside_data, resolve_config
from edp_det.harness.stats import POWER
from edp_det.runtime.checkpoint import atomic_write_text
from edp_det.runtime.config import config_hash, deep_merge, dump_config, load_config
from edp_det.runtime.errors import ConfigError
from edp_det.runtime.logs import format_duration, read_metrics
from edp_det.harness.report import (comparison_rows, format_comparison_table, format_paired_table, format_seed_table,
                                    seed_summary, verdict_sentence)

logger = logging.getLogger(__name__)

__all__ = ["RunRecord", "PlannedRun", "run_name", "plan_runs", "plan_grid", "parse_seeds", "comparison_config",
           "planned_config", "check_reusable", "check_grid", "grid_record", "machine_record", "run_comparison",
           "collect_runs", "paired_comparisons", "train_script", "available_cores", "START_MODES", "CONTROL",
           "build_report", "report_rows", "measure_side_by_side", "plot_map_vs_flops", "layerwise_methods",
           "plot_layerwise", "plot_sparsity_curves", "DEFAULT_METHODS", "FIG5_METHODS"]

DEFAULT_METHODS = ("baseline", "edp", "l1_filter", "slimming", "svd", "lrs", "admm_lrs")
FIG5_METHODS = ("edp", "slimming", "svd")
BASELINE = "baseline"
CONTROL = "control"
START_MODES = ("scratch", "trained")


def run_name(method: str, target: float | None) -> str:
    """``baseline`` or ``<method>_<target>`` (target as written by ``%g``, e.g. ``edp_0.4``)."""
    return BASELINE if method == BASELINE or target is None else f"{method}_{float(target):g}"


def plan_runs(methods, targets, name_by_method: bool = False) -> list[tuple[str, str, float | None]]:
    """``[(run name, method, target)]``: the baseline once (if listed), every other method at every target.
    ``name_by_method`` (one target only): runs are named by their method alone (``edp`` instead of ``edp_0.4``)."""
    from edp_det.methods import METHODS

    methods = [m.strip() for m in methods if m.strip()]
    if not methods:
        raise ValueError("--methods: give at least one method")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods: duplicates in {methods}")
    targets = [float(t) for t in targets]
    bad = [t for t in targets if not 0 < t < 1]
    if bad:
        raise ValueError(f"--flops-targets: every target must be in (0, 1), got {bad}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"--flops-targets: a target is repeated in {targets}")
    if any(m != BASELINE for m in methods) and not targets:
        raise ValueError("--flops-targets: give at least one target")
    if name_by_method and len(targets) > 1:
        raise ValueError(f"runs named by method need a single FLOPs target, got {targets}")
    plan = []
    for m in methods:
        if m == BASELINE:
            plan.append((BASELINE, BASELINE, None))
        else:
            plan.extend((m if name_by_method else run_name(m, t), m, t) for t in targets)
    return plan


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a grid. ``name``: its folder relative to the grid (``edp_0.4/seed1``; without seeds
    ``edp_0.4``); ``group``: the (method, target) it belongs to (``edp_0.4``, ``baseline``, ``control``); ``seed``:
    None = the config's; ``start_from``: the name of the run whose ``model_final.pt`` it starts from (trained
    start); ``schedule``: trains with ``compress.schedule`` (True), without (False), as the config says (None)."""

    name: str
    group: str
    method: str
    target: float | None
    seed: int | None = None
    start_from: str | None = None
    schedule: bool | None = None


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; ValueError naming ``--seeds`` when empty, not integers ≥ 0 or repeated."""
    parts = [t.strip() for t in str(text).split(",")]
    if not text or not all(parts):
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2")
    try:
        seeds = [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: not an integer list; give comma-separated integers, e.g. 0,1,2") \
            from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is repeated")
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds {text!r}: seeds are integers ≥ 0")
    return seeds


def plan_grid(methods, targets, seeds=None, start: str = "scratch",
              name_by_method: bool = False) -> tuple[list[PlannedRun], list[str]]:
    """The runs of a grid and notes on how the request was completed.

    ``seeds`` None: one run per (method, target) with the config's seed, in ``<group>/``; otherwise one per seed in
    ``<group>/seed<k>/``. ``start="trained"``: per seed the baseline trains with the config's schedule, then every
    compressed method and a ``control`` (the baseline trained on without compression) start from that baseline's
    final weights with ``compress.schedule``; the baseline is added when ``methods`` lacks it (noted)."""
    if start not in START_MODES:
        raise ValueError(f"--start {start!r}: choose one of {', '.join(START_MODES)}")
    notes = []
    methods = [m.strip() for m in methods if m.strip()]
    if start == "trained" and BASELINE not in methods:
        methods = [BASELINE] + methods
        notes.append("--start trained: baseline added to --methods (every compressed run starts from it)")
    base = plan_runs(methods, targets, name_by_method)
    runs = []
    for seed in (list(seeds) if seeds is not None else [None]):
        def at(group):
            return group if seed is None else f"{group}/seed{seed}"

        for group, method, target in base:
            if start == "scratch":
                runs.append(PlannedRun(at(group), group, method, target, seed))
            elif method == BASELINE:
                runs.append(PlannedRun(at(group), group, method, target, seed, schedule=False))
                runs.append(PlannedRun(at(CONTROL), CONTROL, BASELINE, None, seed, at(group), True))
            else:
                runs.append(PlannedRun(at(group), group, method, target, seed, at(BASELINE), True))
    first = sorted(runs, key=lambda r: r.start_from is not None)     # starting points first, plan order kept
    return first, notes


def method_overrides(overrides, method: str) -> tuple[list[str], dict]:
    """Split the grid's ``key=value`` overrides for one run of ``method``: ``compress.*`` options that ``method``
    declares become a partial config applied after the run's method is set (so ``compress.slimming_lambda=1``
    reaches the Slimming runs of a grid built on an EDP config), options that only other methods declare are left
    out of this run (logged), everything else stays an ordinary override (an unknown key is still an error)."""
    from edp_det.methods import METHODS, config_schema
    from edp_det.runtime.config import parse_overrides, set_by_dotted
    from edp_det.runtime.schema import lookup

    schema = config_schema("detection")
    own = schema.tree(method)
    others = [schema.tree(m) for m in METHODS if m != method]
    plain, layer = [], {}
    for text, (key, value) in zip(overrides, parse_overrides(overrides)):
        if not key.startswith("compress."):
            plain.append(text)
        elif lookup(own, key) is not None:
            layer = deep_merge(layer, set_by_dotted({}, key, value))
        elif any(lookup(t, key) is not None for t in others):
            logger.info("%s: %s is an option of other methods; not applied to this run", method, text)
        else:
            plain.append(text)
    return plain, layer


def comparison_config(config, method: str, target: float | None, data_root=None, overrides=(),
                      extra: dict | None = None) -> dict:
    """The config of one run: ``config`` + ``overrides`` + data root, then the run's method and FLOPs target (and
    ``extra``, a partial config) as a last layer (``compress`` keys of the config's method that ``method`` does not
    declare are dropped, logged; method-specific overrides follow :func:`method_overrides`)."""
    plain, own = method_overrides(list(overrides), method)
    layer = deep_merge({"method": method}, own)
    if target is not None:
        layer = deep_merge(layer, {"compress": {"flops_target": target}})
    layer = deep_merge(layer, extra or {})
    return resolve_config(config, plain, task="detection", data_root=data_root, extra=layer,
                          extra_source=f"comparison run {run_name(method, target)}")


def planned_config(config, run: PlannedRun, output_dir, data_root=None, overrides=(), threads: int | None = None
                   ) -> dict:
    """The resolved config of ``run`` in the grid at ``output_dir``: its seed, its starting weights
    (``model.weights`` = the ``model_final.pt`` of ``run.start_from``, instead of any backbone weights the config
    names) and schedule, ``train.threads``."""
    out = Path(output_dir)
    extra: dict = {}
    if run.seed is not None:
        extra["seed"] = run.seed
    if run.start_from is not None:
        # the whole trained detector: the config's sources of initial backbone weights do not apply
        extra["model"] = {"weights": str(out / run.start_from / "model_final.pt"), "weights_backbone": None,
                          "backbone_checkpoint": None}
    if run.schedule is not None:
        extra["compress"] = {"schedule": {"enabled": bool(run.schedule)}}
    cfg = comparison_config(config, run.method, run.target, data_root, overrides, extra)
    if threads is not None:
        cfg["train"]["threads"] = int(threads)
    cfg["output_dir"] = str(out / run.name)
    check_output_dir_outside_data(cfg)
    return cfg


#: keys of a finished run's config that must match the planned one for the run to be reused
_REUSE_KEYS = (("method",), ("seed",), ("train", "epochs"), ("train", "lr"), ("compress", "epoch_es"),
               ("compress", "flops_target"), ("model", "weights"), ("model", "weights_backbone"),
               ("model", "backbone_checkpoint"), ("model", "depth"))


def check_reusable(run_dir: Path, cfg: dict) -> None:
    """ConfigError naming the differing keys and the folder when ``run_dir`` holds a run (finished or interrupted)
    trained with another config than ``cfg``."""
    stored = run_dir / "config.yaml"
    if not stored.exists():
        return
    try:
        old = load_config(stored, defaults=None)
    except Exception:   # noqa: BLE001 - a broken stored config cannot be compared; the run's own checks decide
        return
    changed = []
    for k in _REUSE_KEYS:
        a, b = old, cfg
        for part in k:
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if k == ("method",) or a is not None or b is not None:
            if a != b and not (k[-1] == "flops_target" and cfg.get("method") == BASELINE):
                changed.append(f"{'.'.join(k)}: {a!r} there, {b!r} now")
    if changed:
        raise ConfigError(f"--output-dir: {run_dir} holds a run made with another config ({'; '.join(changed)}); "
                          "choose a new --output-dir, or delete that folder to train it again")


# ------------------------------------------------------------------------------------------------ run
GRID_FILE = "grid.json"


def grid_record(base_cfg: dict, start: str) -> dict:
    """What identifies a grid: the hash of its shared config (without ``output_dir`` and ``train.threads``) and
    its start protocol."""
    shared = json.loads(json.dumps(base_cfg, default=str))
    shared.pop("output_dir", None)
    shared.get("train", {}).pop("threads", None)
    return {"config_hash": config_hash(shared), "start": start, "config": shared}


def check_grid(out: Path, record: dict, config) -> None:
    """ConfigError naming the option and the folder when ``out`` holds a grid made with another config or start
    protocol (its ``grid.json``)."""
    path = out / GRID_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return
    if old.get("start", "scratch") != record["start"]:
        raise ConfigError(f"--start {record['start']}: {out} holds a grid made with --start "
                          f"{old.get('start', 'scratch')}; choose a new --output-dir, or delete {out} to start over")
    if old.get("config_hash") not in (None, record["config_hash"]):
        keys = [k for k in _differing_keys(old.get("config") or {}, record["config"])
                if not _added_with_default(k, old.get("config") or {}, record["config"])]
        if not keys:    # only keys a newer edp-det added, at their defaults: the same grid
            return
        raise ConfigError(f"--config {config}: {out} holds a grid made with another config (config hash "
                          f"{old['config_hash']} there, {record['config_hash']} now; differs in "
                          f"{', '.join(keys[:5]) or 'its content'}); choose a new --output-dir, or delete {out} to "
                          "start over")


def _added_with_default(key: str, old: dict, new: dict) -> bool:
    """Whether ``key`` is absent from the ``old`` config and holds its schema default in ``new`` (an option that a
    later version added does not make an existing grid another one)."""
    from edp_det.methods import config_schema
    from edp_det.runtime.config import get_by_dotted

    missing = object()
    if get_by_dotted(old, key, default=missing) is not missing:
        return False
    defaults = config_schema(new.get("task", "detection")).defaults(new.get("method"))
    default = get_by_dotted(defaults, key, default=missing)
    return default is not missing and get_by_dotted(new, key, default=missing) == default


def _differing_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def machine_record(jobs: int, threads: int | None) -> dict:
    """Package versions, CPU model and cores, jobs and threads per run (the reproducibility record)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "edp-det", "albumentations"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"versions": versions, "machine": {"cpu": cpu, "cores": available_cores(), "jobs": jobs,
                                               "threads_per_run": threads, "platform": platform.platform()}}


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_comparison(config, methods, targets, output_dir, data_root=None, overrides=(), build: bool = True,
                   name_by_method: bool = False, seeds=None, start: str = "scratch", jobs: int = 1,
                   command: str | None = None) -> dict:
    """Train every planned run (:func:`plan_grid`) that has no ``metrics.json`` yet (interrupted ones resume),
    ``jobs`` at a time (``jobs`` > 1: subprocesses of ``tools/train_det.py`` with ``train.threads`` = cores / jobs,
    each logging to its run folder), then (``build``) write the report.

    Every check (options, the folder's earlier grid, the finished runs' configs) comes before the first run. A run
    that fails is recorded (error line, log path) and does not stop the others; runs starting from its weights are
    not run. Returns ``{"runs": {name: "done"|"skipped"|"failed"|"not run"}, "failed": {name: {...}}, "notes": [...],
    "report": path or None}``.
    """
    if int(jobs) < 1:
        raise ValueError(f"--jobs {jobs}: must be at least 1")
    jobs = int(jobs)
    out = Path(output_dir)
    plan, notes = plan_grid(methods, targets, seeds, start, name_by_method)
    for n in notes:
        logger.info("%s", n)
    base_cfg = comparison_config(config, BASELINE, None, data_root, overrides)
    record = grid_record(base_cfg, start)
    check_grid(out, record, config)
    threads = max(1, available_cores() // jobs) if jobs > 1 else None
    cfgs = {r.name: planned_config(config, r, out, data_root, overrides, threads) for r in plan}
    for r in plan:
        check_reusable(out / r.name, cfgs[r.name])
    out.mkdir(parents=True, exist_ok=True)
    old_runs = {}
    if (out / GRID_FILE).exists():
        try:
            old_runs = json.loads((out / GRID_FILE).read_text(encoding="utf-8")).get("runs") or {}
        except ValueError:
            old_runs = {}
    record.update(machine_record(jobs, threads), command=command, jobs=jobs, runs=old_runs)
    grid = _Grid(out, record, plan, jobs)
    todo = []
    for r in plan:
        if (out / r.name / "metrics.json").exists():
            logger.info("%s: finished earlier (metrics.json present), skipped", r.name)
            grid.status[r.name] = "skipped"
        else:
            todo.append(r)
    grid.save()
    if jobs == 1:
        for r in todo:
            if grid.blocked(r):
                continue
            grid.finish(r, *_train_in_process(cfgs[r.name], out / r.name))
    else:
        _run_parallel(grid, todo, cfgs, threads)
    report = None
    if build:
        report = build_report(out, base_cfg, expected=[r.name for r in plan])
    return {"runs": dict(grid.status), "failed": dict(grid.failed), "notes": notes, "report": report}


class _Grid:
    """Book-keeping of one grid execution: statuses, failures, summary lines with the ETA, ``grid.json``."""

    def __init__(self, out: Path, record: dict, plan: list[PlannedRun], jobs: int):
        self.out, self.record, self.jobs = out, record, jobs
        self.status: dict[str, str] = {}
        self.failed: dict[str, dict] = {}
        self.total = len(plan)
        self.walls: list[float] = []

    def blocked(self, run: PlannedRun) -> bool:
        """Whether ``run`` cannot start because its starting run failed (then recorded as not run)."""
        if run.start_from is None or self.status.get(run.start_from) in ("done", "skipped"):
            return False
        self.status[run.name] = "not run"
        self.failed[run.name] = {"error": f"not run: its starting run {run.start_from} did not finish",
                                 "log": None}
        logger.error("%s: not run (its starting run %s did not finish)", run.name, run.start_from)
        self.save()
        return True

    def finish(self, run: PlannedRun, ok: bool, wall: float, error: str | None, log: Path | None) -> None:
        self.status[run.name] = "done" if ok else "failed"
        now = time.time()
        self.record["runs"][run.name] = {"status": self.status[run.name], "wall_s": round(wall, 1),
                                         "started": round(now - wall, 3), "ended": round(now, 3),
                                         "log": None if log is None else str(log), "error": error}
        self.walls.append(wall)
        left = self.total - len(self.status)
        eta = (sum(self.walls) / len(self.walls)) * left / self.jobs
        head = f"[{len(self.status)}/{self.total}] {run.name}"
        if ok:
            logger.info("%s finished in %s; grid ETA %s (%d left)", head, format_duration(wall),
                        format_duration(eta), left)
        else:
            self.failed[run.name] = {"error": error, "log": None if log is None else str(log)}
            logger.error("%s FAILED after %s: %s (log: %s); grid ETA %s (%d left)", head, format_duration(wall),
                         error, log, format_duration(eta), left)
        self.save()

    def save(self) -> None:
        from edp_det.harness.cli import write_json

        write_json(self.record, self.out / GRID_FILE)


def _train_in_process(cfg: dict, run_dir: Path) -> tuple[bool, float, str | None, Path]:
    """Train one run in this process (resuming an interrupted one); its log lines also go to ``run_dir/log.txt``.
    Returns (finished, wall seconds, error line, log path)."""
    from edp_det.train.detection import DetectionTask
    from edp_det.train.engine import Trainer

    t0 = time.time()
    log = run_dir / "log.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logger.info("%s: training (method=%s, flops_target=%s, seed=%s)", run_dir, cfg["method"],
                    cfg["compress"].get("flops_target"), cfg["seed"])
        Trainer(cfg, DetectionTask(cfg), run_dir, resume="auto").run()
        return True, time.time() - t0, None, log
    except Exception as e:  # noqa: BLE001 - a failed run is reported; the grid goes on (Ctrl-C propagates)
        logger.error("%s: failed: %s", run_dir, e, exc_info=True)
        return False, time.time() - t0, (str(e).strip().splitlines() or [type(e).__name__])[0], log
    finally:
        root.removeHandler(handler)
        handler.close()


def train_script() -> Path:
    """``tools/train_det.py`` next to the package (the training tool every parallel run executes)."""
    path = Path(__file__).resolve().parents[2] / "tools" / "train_det.py"
    if not path.is_file():
        raise ValueError(f"--jobs: {path} not found (parallel runs execute tools/train_det.py from a source checkout)")
    return path


def _run_parallel(grid: _Grid, todo: list[PlannedRun], cfgs: dict, threads: int) -> None:
    """Run ``todo`` as subprocesses, ``grid.jobs`` at a time, a run only after its starting run finished. Ctrl-C:
    every child gets SIGINT (it stops at once, its checkpoints intact) and is waited for, then it propagates."""
    script = train_script()
    plans = grid.out / ".grid"
    plans.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pending, running = list(todo), {}
    try:
        while pending or running:
            for r in list(pending):
                if len(running) >= grid.jobs:
                    break
                if r.start_from is not None and grid.status.get(r.start_from) not in ("done", "skipped"):
                    if r.start_from in grid.status:          # failed or not run: this one cannot start
                        pending.remove(r)
                        grid.blocked(r)
                    continue
                pending.remove(r)
                flat = r.name.replace("/", "_")
                cfg_file = dump_config(cfgs[r.name], plans / f"{flat}.yaml")
                console = plans / f"{flat}.console.txt"
                with open(console, "ab") as fh:
                    proc = subprocess.Popen([sys.executable, str(script), "--config", str(cfg_file), "--output-dir",
                                             cfgs[r.name]["output_dir"], "--resume"], stdout=fh,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
                logger.info("%s: started (pid %d, %d threads; console: %s)", r.name, proc.pid, threads, console)
                running[r.name] = (proc, time.time(), r, console)
            for name, (proc, t0, r, console) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                ok = proc.returncode == 0 and (grid.out / name / "metrics.json").exists()
                error = None if ok else _error_line(console, proc.returncode)
                grid.finish(r, ok, time.time() - t0, error, grid.out / name / "log.txt")
            if running:
                time.sleep(0.2)
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            proc.send_signal(signal.SIGINT)
        for proc, *_ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _error_line(console: Path, code: int) -> str:
    """The tool's one-line error (``train_det: error|failed: ...``) from a child's console, else its exit status."""
    try:
        lines = console.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("train_det: "):
            return line
    return f"exit status {code}" + (f": {lines[-1]}" if lines else "")


# ------------------------------------------------------------------------------------------------ collect
@dataclass
class RunRecord:
    name: str
    path: Path
    method: str
    target: float | None
    metrics: dict
    config: dict
    pm: dict | None = None
    epochs: list[dict] = field(default_factory=list)   # end_epoch records, one per epoch (the last one wins)
    group: str = ""                                     # the (method, target) folder: edp_0.4, baseline, control
    seed: int | None = None                             # from a seed<k> folder; None: a run without seed folders


def _read_run(d: Path, name: str, group: str, seed: int | None) -> RunRecord:
    mfile = d / "metrics.json"
    try:
        metrics = json.loads(mfile.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{mfile}: not valid JSON ({e})") from None
    config = load_config(d / "config.yaml", defaults=None) if (d / "config.yaml").exists() else {}
    method = metrics.get("method") or config.get("method") or group
    target = None if method == BASELINE else (config.get("compress") or {}).get("flops_target")
    pm = json.loads((d / "pm_report.json").read_text(encoding="utf-8")) if (d / "pm_report.json").exists() \
        else None
    epochs: dict[int, dict] = {}
    if (d / "metrics_log.jsonl").exists():
        for rec in read_metrics(d / "metrics_log.jsonl"):
            if rec.get("phase") == "end_epoch" and isinstance(rec.get("epoch"), int):
                epochs[rec["epoch"]] = rec      # a resumed run may repeat an epoch: the last record wins
    return RunRecord(name, d, method, target, metrics, config, pm, [epochs[e] for e in sorted(epochs)], group, seed)


def collect_runs(output_dir) -> dict[str, RunRecord]:
    """Every finished run (a folder holding ``metrics.json``) of ``output_dir``: ``<group>/`` or
    ``<group>/seed<k>/`` (named ``<group>/seed<k>``); baseline first, then control, then by method, target and
    seed."""
    out = Path(output_dir)
    if not out.is_dir():
        raise ValueError(f"{out}: output directory not found")
    runs = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        if (d / "metrics.json").exists():
            runs.append(_read_run(d, d.name, d.name, None))
        for sd in sorted(p for p in d.iterdir() if p.is_dir() and re.fullmatch(r"seed\d+", p.name)):
            if (sd / "metrics.json").exists():
                runs.append(_read_run(sd, f"{d.name}/{sd.name}", d.name, int(sd.name[4:])))
    from edp_det.methods import METHODS

    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (r.method != BASELINE, r.group == CONTROL, order.get(r.method, len(order)), r.method,
                             r.target if r.target is not None else -1, r.group,
                             -1 if r.seed is None else r.seed, r.name))
    return {r.name: r for r in runs}


# ------------------------------------------------------------------------------------------------ speed
def measure_side_by_side(runs: dict[str, RunRecord], cfg: dict, cache: Path | None = None,
                         optimize: bool = False) -> dict | None:
    """FPS of every run's ``model_final.pt`` measured alternately (baseline first) with the config's benchmark
    settings (``optimize``: of their inference form, see :func:`edp_det.deploy.inference.optimize_for_inference`);
    reused from ``cache`` when it covers the same model files. None when ``benchmark.enabled`` is false or no
    model file exists."""
    b = cfg["benchmark"]
    if not b["enabled"]:
        return None
    files = {n: r.path / "model_final.pt" for n, r in runs.items() if (r.path / "model_final.pt").exists()}
    if not files:
        return None
    stamp = {n: [str(p), os.path.getmtime(p)] for n, p in files.items()}
    if cache is not None and cache.exists():
        try:
            cached = json.loads(cache.read_text(encoding="utf-8"))
            if cached.get("files") == stamp:
                logger.info("side-by-side speed: reusing %s", cache)
                return cached
        except ValueError:
            pass
    from edp_det.deploy.benchmark import compare_side_by_side
    from edp_det.deploy.serialization import load_compressed

    first = next(iter(runs.values()))
    size = tuple(first.metrics.get("input_size") or (3, cfg["model"]["min_size"], cfg["model"]["min_size"]))
    from edp_det.harness.cli import default_device

    device = b["device"] or cfg.get("device") or default_device()
    models = {n: load_compressed(p) for n, p in files.items()}
    logger.info("side-by-side speed of %d models on %s at %s", len(models), device, size)
    res = compare_side_by_side(models, input_size=size, device=device, rounds=5, iters_per_round=max(1, b["iters"]),
                               warmup=b["warmup"], peak_memory=b["peak_memory"] and not optimize,
                               model_paths={n: str(p) for n, p in files.items()}, optimize=optimize)
    res["files"] = stamp
    if cache is not None:
        atomic_write_text(json.dumps(res, indent=2, default=float), cache)
    return res


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """Lay out, write ``path`` as a 120-dpi PNG, free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_map_vs_flops(runs: dict[str, RunRecord], path) -> Path | None:
    """mAP (VOC07) vs achieved backbone FLOPs cut, one curve per method, mean ± standard deviation over the seeds
    of each (method, target) as error bars; the baseline (and the control) at 0 and as a line."""
    from edp_det.harness.stats import spread

    groups: dict[str, list[RunRecord]] = {}
    for r in runs.values():
        if r.metrics.get("mAP_voc07") is not None:
            groups.setdefault(r.group or r.name, []).append(r)
    curves: dict[str, list[tuple[float, float, float]]] = {}
    refs = {}
    for g, rs in groups.items():
        m = spread(r.metrics["mAP_voc07"] for r in rs)
        if rs[0].method == BASELINE:
            refs[g] = m
            continue
        cut = spread(r.metrics.get("r_flops_backbone") for r in rs)
        if cut is not None:
            curves.setdefault(rs[0].method, []).append((100 * cut.mean, m.mean, m.std))
    if not curves and not refs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, pts in curves.items():
        pts.sort()
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    for (g, m), style in zip(refs.items(), ("k", "0.5")):
        ax.axhline(m.mean, color=style, ls="--", lw=1, label=g if g != BASELINE else "baseline")
        ax.errorbar([0], [m.mean], yerr=[m.std], color=style, marker="*", ms=9, capsize=3)
    ax.set_xlabel("backbone FLOPs cut R_FLOPs (%)")
    ax.set_ylabel("mAP (VOC07, IoU 0.5), mean ± std over seeds")
    ax.set_title("Accuracy vs compression (cf. Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _short(name: str) -> str:
    s = short_body_name(name).replace("layer", "L").replace("downsample.0", "ds").replace("conv", "c")
    return s


def layer_counts(pm: dict) -> list[dict]:
    """Per layer of a pm_report: ``{"name", "channels", "rank", "channels_before", "rank_before"}``; the rank of a
    merged (dense) layer is its full rank ``min(c_out, c_in·k·k)``."""
    out = []
    for l in pm.get("layers", []):
        ci, r, co = l["after"]
        kk = l["kernel"][0] * l["kernel"][1]
        ci0, r0, co0 = l["before"]
        out.append({"name": l["name"], "channels": co, "channels_before": co0,
                    "rank": min(co, ci * kk) if l.get("merged") else r, "rank_before": min(co0, ci0 * kk)})
    return out


def layerwise_methods(runs: dict[str, RunRecord], target: float, methods=FIG5_METHODS) -> list[str]:
    """The methods of ``methods`` that have a finished run with a PM report at ``target`` (the curves
    :func:`plot_layerwise` draws), in run order."""
    shown = [r.method for r in runs.values() if r.method in methods and r.target == target and r.pm]
    return list(dict.fromkeys(shown))


def plot_layerwise(runs: dict[str, RunRecord], path, target: float, methods=FIG5_METHODS) -> Path | None:
    """Live output channels (a) and ranks (b) per backbone layer after pruning, for ``methods`` at ``target``."""
    sel = [r for r in runs.values() if r.method in layerwise_methods(runs, target, methods) and r.target == target
           and r.pm]
    if not sel:
        return None
    order: list[str] = []
    for r in sel:
        for l in r.pm.get("layers", []):
            if l["name"] not in order:
                order.append(l["name"])
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.28 * len(order)), 6.5), sharex=True)
    x = list(range(len(order)))
    ref = None
    for r in sel:
        counts = {c["name"]: c for c in layer_counts(r.pm)}
        ref = ref or counts
        for ax, key in zip(axes, ("channels", "rank")):
            ax.plot([i for i, n in enumerate(order) if n in counts], [counts[n][key] for n in order if n in counts],
                    marker=".", label=r.method)
    if ref:
        for ax, key in zip(axes, ("channels_before", "rank_before")):
            ax.plot([i for i, n in enumerate(order) if n in ref], [ref[n][key] for n in order if n in ref],
                    color="0.6", ls=":", label="original")
    axes[0].set_ylabel("(a) output channels")
    axes[1].set_ylabel("(b) rank")
    axes[0].set_title(f"Layer-wise channels and ranks at R_FLOPs {target:.0%} (cf. Fig. 5)")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([_short(n) for n in order], rotation=90, fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_sparsity_curves(runs: dict[str, RunRecord], path) -> Path | None:
    """Sparse ratio of params (a) and FLOPs (b) per epoch while regularised; the epoch PM followed dashed."""
    sel = [(r, [e for e in r.epochs if e.get("sparse_params") is not None]) for r in runs.values()]
    sel = [(r, e) for r, e in sel if e]
    if not sel:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    es_marks = set()
    n_epochs = max(int((r.config.get("train") or {}).get("epochs") or 0) for r, _ in sel)
    for r, eps in sel:
        xs = [e["epoch"] for e in eps]
        axes[0].plot(xs, [100 * e["sparse_params"] for e in eps], marker="o", label=r.name)
        fl = [(e["epoch"], e.get("sparse_flops")) for e in eps if e.get("sparse_flops") is not None]
        if fl:
            axes[1].plot([a for a, _ in fl], [100 * b for _, b in fl], marker="o", label=r.name)
        # the epoch the run pruned after (target-driven EDP: the one that reached the target), else Epoch_ES
        es = next((e["epoch"] for e in r.epochs if e.get("pruned")), (r.config.get("compress") or {}).get("epoch_es"))
        if es is not None:
            es_marks.add(int(es))
    for ax, label in zip(axes, ("(a) sparse ratio of params (%)", "(b) sparse ratio of FLOPs (%)")):
        for es in sorted(es_marks):
            ax.axvline(es, color="r", ls="--", lw=1)
        if n_epochs:
            ax.set_xlim(0.5, n_epochs + 0.5)
            ax.set_xticks(range(1, n_epochs + 1))
        ax.set_xlabel("epoch (red dashed: ES epoch)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Sparsity during regularised training (cf. Fig. 3)")
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------------------------ report
def report_rows(runs: dict[str, RunRecord], bench: dict | None = None) -> list[dict]:
    """The table rows (:func:`edp_det.harness.report.comparison_rows`) of finished runs, with the side-by-side
    speed figures of ``bench`` where given; ``mAP_delta`` against the baseline of the same seed; each row also
    carries its ``group`` and ``seed``."""
    rows = []
    for seed in dict.fromkeys(r.seed for r in runs.values()):
        sub = {n: r for n, r in runs.items() if r.seed == seed}
        ref = BASELINE if seed is None else f"{BASELINE}/seed{seed}"
        for row in comparison_rows(_metrics_for_table(sub), bench, baseline=ref):
            row["seed"], row["group"] = sub[row["run"]].seed, sub[row["run"]].group
            rows.append(row)
    return rows


def paired_comparisons(rows: list[dict], key: str = "mAP_voc07") -> list[dict]:
    """Per FLOPs target: the paired differences over seeds (:func:`edp_det.harness.stats.paired_difference`) of
    every compressed group against EDP at that target and against the control (the baseline trained on with the
    compression schedule; without one, the baseline). ``[{"target", "reference", "diffs": [(group, diff)]}]``."""
    from edp_det.harness.stats import paired_difference

    by_group: dict[str, dict] = {}
    meta: dict[str, tuple] = {}
    for r in rows:
        if r.get("seed") is None or r.get(key) is None:
            continue
        by_group.setdefault(r["group"], {})[r["seed"]] = r[key]
        meta[r["group"]] = (r.get("method"), r.get("r_flops_requested"))
    control = CONTROL if CONTROL in by_group else BASELINE if BASELINE in by_group else None
    out = []
    for t in sorted({tg for m, tg in meta.values() if tg is not None}):
        comp = [g for g, (m, tg) in meta.items() if tg == t and m != BASELINE]
        edp = run_name("edp", t)
        if edp in by_group:
            out.append({"target": t, "reference": edp,
                        "diffs": [(g, paired_difference(by_group[g], by_group[edp])) for g in comp if g != edp]})
        if control is not None:
            out.append({"target": t, "reference": control,
                        "diffs": [(g, paired_difference(by_group[g], by_group[control])) for g in comp]})
    return out


def _metrics_for_table(runs: dict[str, RunRecord]) -> dict[str, dict]:
    out = {}
    for n, r in runs.items():
        m = dict(r.metrics)
        m.setdefault("method", r.method)
        m["config"] = r.config
        if r.pm and r.pm.get("r_flops_dense") is not None:
            m["r_flops_backbone_dense"] = r.pm["r_flops_dense"]
        out[n] = m
    return out


def _seed_sections(rows: list[dict], seeds: list) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    lines = ["## Over seeds", "", f"Seeds {', '.join(str(s) for s in seeds)}: mean ± sample standard deviation over "
             "the seeds of each (method, target); FPS from the side-by-side measurement where made.", "",
             format_seed_table(seed_summary(groups)), "", "## Paired differences", "",
             "mAP_voc07 of each group minus that of the reference, per seed (same seed: same starting detector and "
             "data order), averaged; 95 % interval: mean ± t(0.975, n−1)·s/√n over the n shared seeds. An "
             "interval that holds 0 does not make two groups equal: *detectable Δ* is the smallest true "
             f"difference these seeds would find beyond the interval in {100 * POWER:.0f} % of grids, at the "
             "spread the differences showed (the paired t-test's power, noncentral t), and the last column how "
             "many seeds a difference of one point (0.010) needs; both take the spread of these seeds as the "
             "true one, a rough guide below about ten seeds.", ""]
    sentences = []
    for comp in paired_comparisons(rows):
        title = f"vs {comp['reference']} at {comp['target']:.0%} FLOPs target"
        lines += [format_paired_table(title, comp["diffs"]), ""]
        sentences.append(verdict_sentence(f"At {comp['target']:.0%}, against {comp['reference']}",
                                          comp["reference"], comp["diffs"]))
    return lines + [f"* {s_}" for s_ in sentences] + [""]


def _reproducibility(out: Path, runs: dict[str, RunRecord]) -> list[str]:
    """The reproducibility record from ``grid.json`` (command, config hash, versions, machine) and the wall time
    of every run."""
    path = out / GRID_FILE
    if not path.exists():
        return []
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return []
    mach = g.get("machine") or {}
    vers = ", ".join(f"{k} {v}" for k, v in (g.get("versions") or {}).items())
    lines = ["## Reproducibility", "", f"* command: `{g.get('command') or '-'}`",
             f"* config hash: `{g.get('config_hash')}`; start: `{g.get('start')}`", f"* versions: {vers}",
             f"* machine: {mach.get('cpu')}, {mach.get('cores')} cores; {mach.get('jobs')} run(s) at once, "
             f"{mach.get('threads_per_run') or 'default'} threads per run", "",
             "| run | status | wall time | train time | log |", "|---|---|---|---|---|"]
    done = g.get("runs") or {}
    for name in dict.fromkeys(list(runs) + list(done)):
        rec = done.get(name) or {}
        tt = runs[name].metrics.get("train_time_s") if name in runs else None
        wall = rec.get("wall_s")
        status = rec.get("status") or ("finished" if name in runs else "-")
        if rec.get("error"):
            status += ": " + str(rec["error"]).replace("|", "&#124;")
        lines.append(f"| {name} | {status} | {'-' if wall is None else format_duration(wall)} | "
                     f"{'-' if tt is None else format_duration(tt)} | {rec.get('log') or '-'} |")
    return lines + [""]


def build_report(output_dir, cfg: dict | None = None, expected=None, bench: dict | None | bool = None) -> Path:
    """Write ``report.md`` and the figures from the finished runs in ``output_dir``; returns the report path.

    ``cfg``: the comparison's base config (benchmark settings; None: no side-by-side measurement);
    ``expected``: planned run names (those missing are listed); ``bench``: a precomputed compare_side_by_side
    result, or False to skip measuring.
    """
    out = Path(output_dir)
    runs = collect_runs(out)
    if not runs:
        raise ValueError(f"{out}: no finished runs (no <run>/metrics.json)")
    if BASELINE in runs:   # the baseline leads: compare_side_by_side takes the first model as the reference
        runs = {BASELINE: runs[BASELINE], **{k: v for k, v in runs.items() if k != BASELINE}}
    if bench is None and cfg is not None:
        bench = measure_side_by_side(runs, cfg, cache=out / "bench.json")
    bench = bench or None
    rows = report_rows(runs, bench)
    seeds = list(dict.fromkeys(r.seed for r in runs.values()))
    one = {n: r for n, r in runs.items() if r.seed == seeds[0]}    # the per-layer and sparsity figures: one seed
    figs = {"fig4": plot_map_vs_flops(runs, out / "fig4_map_vs_flops.png"),
            "fig3": plot_sparsity_curves(one, out / "fig3_sparsity.png")}
    targets = sorted({r.target for r in runs.values() if r.target is not None})
    fig5 = [(t, plot_layerwise(one, out / f"fig5_layers_{t:g}.png", t), layerwise_methods(one, t)) for t in targets]
    first = next(iter(runs.values()))
    # the schedule the compressed runs trained with (in the trained-start protocol the baseline's differs)
    comp = next((r for r in runs.values() if r.target is not None), first)
    c = comp.config or {}
    tr, cp = c.get("train") or {}, c.get("compress") or {}
    trained = any(r.group == CONTROL for r in runs.values())
    base_epochs = ((first.config or {}).get("train") or {}).get("epochs", "?")
    lines = ["# Compression methods compared on one harness", "",
             f"Runs in `{out}`: same detector, data and schedule"
             + (" and seed" if seeds == [None] else f", seeds {', '.join(str(x) for x in seeds)}")
             + (f"; the baseline of each seed trains {base_epochs} epochs, then every compressed run and the control "
                f"start from its final weights with `compress.schedule`: {tr.get('epochs', '?')} epochs, compressing "
                f"after epoch {cp.get('epoch_es', '?')}" if trained else
                f"; every method trains {tr.get('epochs', '?')} epochs in total and compresses after epoch "
                f"`compress.epoch_es` = {cp.get('epoch_es', '?')}")
             + " (regularised before where the method has a regulariser; fine-tuning after, "
             "the LR schedule continuing; target-driven EDP compresses at the end of the epoch in which the groups it "
             "trained to zero reached the target, if that comes earlier). Data: `"
             + str((c.get("data") or {}).get("root")) + "`; model: "
             f"Faster R-CNN ResNet-{(c.get('model') or {}).get('depth', '?')}, input "
             f"{first.metrics.get('input_size', '?')}.", ""]
    if any(s_ is not None for s_ in seeds):
        lines += _seed_sections(rows, seeds)
    lines += ["## Table (cf. Table XII)" + ("" if seeds == [None] else ": every run"), "",
              format_comparison_table(rows, markdown=True), ""]
    notes = ["R_FLOPs bb: 1 − backbone-body FLOPs / those of the uncompressed detector, recounted on each final "
             "model (convs and linears, 2 FLOPs per multiply-add); req = `compress.flops_target`."]
    if any(r.method in ("lrs", "admm_lrs") for r in runs.values()):
        notes.append("`lrs` / `admm_lrs`: R_FLOPs counts only the non-zero (unmasked) weights of the sparse part, "
                     "as a sparse kernel would execute them; their FPS is the speed of the dense execution "
                     "(`bb dense`).")
    if bench:
        notes.append(f"FPS measured side by side (round-robin, {bench.get('rounds')}×{bench.get('iters_per_round')} "
                     f"calls, medians) on {bench.get('device')} ({bench.get('threads')} threads) at input "
                     f"{bench.get('input_size')}; speedup = latency ratio vs `{bench.get('baseline')}`, ideal = FLOPs "
                     "ratio. Raw numbers: `bench.json`.")
    else:
        notes.append("FPS: per-run figures from metrics.json where measured (`benchmark.enabled`); no side-by-side "
                     "measurement in this report.")
    lines += [f"* {n}" for n in notes] + [""]
    if expected:
        missing = [n for n in expected if n not in runs]
        if missing:
            lines += [f"**Not finished:** {', '.join(missing)}", ""]
    lines += ["## Figures", ""]
    if figs["fig4"]:
        lines += ["mAP vs backbone FLOPs cut, one curve per method (cf. Fig. 4):", "",
                  f"![mAP vs FLOPs]({figs['fig4'].name})", ""]
    for t, p, shown in fig5:
        if p:
            lines += [f"Per-layer output channels and ranks at R_FLOPs {t:.0%}, {' vs '.join(shown)} "
                      "(cf. Fig. 5; dotted: original):", "", f"![layers {t:g}]({p.name})", ""]
    if figs["fig3"]:
        lines += ["Sparse ratios of params and FLOPs per epoch during regularised training, ES epoch dashed "
                  "(cf. Fig. 3):", "", f"![sparsity]({figs['fig3'].name})", ""]
    lines += _reproducibility(out, runs)
    lines += ["## Prune points", "", "| run | requested | achieved | detail |", "|---|---|---|---|"]
    for r in runs.values():
        if not r.pm:
            continue
        req, got = r.pm.get("requested_r_flops"), r.pm.get("achieved_r_flops")
        extra = r.pm.get("criterion", "")
        if r.pm.get("r_flops_dense") is not None:
            extra = f"dense execution R_FLOPs {r.pm['r_flops_dense']:.1%}; sparse nnz {r.pm.get('sparse_nnz')}"
        lines.append(f"| {r.name} | {'-' if req is None else f'{req:.1%}'} | "
                     f"{'-' if got is None else f'{got:.1%}'} | {str(extra).replace('|', '&#124;')} |")
    lines.append("")
    path = out / "report.md"
    atomic_write_text("\n".join(lines), path)
    atomic_write_text(json.dumps(rows, indent=2, default=float), out / "report_rows.json")
    logger.info("report: %s", path)
    return path
