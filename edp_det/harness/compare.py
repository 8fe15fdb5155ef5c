"""Same-harness comparison of compression methods on one detector, data set, schedule and seed, and its report.

:func:`run_comparison` trains every ``method × flops_target`` with the one engine (:class:`edp_det.train.engine.Trainer`
+ :class:`edp_det.train.detection.DetectionTask`) into ``<out>/<method>_<target>/`` (the baseline once, into
``<out>/baseline/``). A run whose ``metrics.json`` exists is skipped; an interrupted one resumes from its latest
checkpoint. :func:`build_report` then reads the finished runs back and writes ``<out>/report.md`` with

* the Table-XII-style table (:func:`edp_det.harness.report.comparison_rows` / :func:`format_comparison_table`), FPS measured
  side by side (:func:`edp_det.deploy.benchmark.compare_side_by_side`, cached in ``bench.json``) when
  ``benchmark.enabled``, else the per-run figures of ``metrics.json``;
* ``fig4_map_vs_flops.png`` — mAP vs backbone FLOPs cut, one curve per method (paper Fig. 4);
* ``fig5_layers_<target>.png`` — per-layer live output channels and ranks of EDP, Slimming and SVD (Fig. 5, from
  each run's ``pm_report.json``);
* ``fig3_sparsity.png`` — sparse ratio of params and FLOPs per epoch during regularised training with the ES epoch
  marked (Fig. 3, from the ``end_epoch`` records of ``metrics_log.jsonl``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from edp_det.ops.adapter import short_body_name
from edp_det.harness.run_config import resolve_config
from edp_det.runtime.config import load_config
from edp_det.runtime.logs import read_metrics
from edp_det.harness.report import comparison_rows, format_comparison_table

logger = logging.getLogger(__name__)

__all__ = ["RunRecord", "run_name", "plan_runs", "comparison_config", "run_comparison", "collect_runs",
           "build_report", "report_rows", "measure_side_by_side", "plot_map_vs_flops", "layerwise_methods",
           "plot_layerwise", "plot_sparsity_curves", "DEFAULT_METHODS", "FIG5_METHODS"]

DEFAULT_METHODS = ("baseline", "edp", "l1_filter", "slimming", "svd", "lrs", "admm_lrs")
FIG5_METHODS = ("edp", "slimming", "svd")
BASELINE = "baseline"


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


def comparison_config(config, method: str, target: float | None, data_root=None, overrides=()) -> dict:
    """The config of one run: ``config`` + ``overrides`` + data root, then the run's method and FLOPs target as a
    last layer (``compress`` keys of the config's method that ``method`` does not declare are dropped, logged)."""
    extra = {"method": method} if target is None else {"method": method, "compress": {"flops_target": target}}
    return resolve_config(config, overrides, task="detection", data_root=data_root, extra=extra,
                          extra_source=f"comparison run {run_name(method, target)}")


def run_comparison(config, methods, targets, output_dir, data_root=None, overrides=(), build: bool = True,
                   name_by_method: bool = False) -> dict:
    """Train every planned run (:func:`plan_runs`) that has no ``metrics.json`` yet (resuming interrupted ones),
    then (``build``) write the report. Returns ``{"runs": {name: "done"|"skipped"}, "report": path or None}``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from edp_det.train.detection import DetectionTask
    from edp_det.train.engine import Trainer

    status = {}
    plan = plan_runs(methods, targets, name_by_method)
    for name, method, target in plan:
        cfg = comparison_config(config, method, target, data_root, overrides)
        run_dir = out / name
        cfg["output_dir"] = str(run_dir)
        if (run_dir / "metrics.json").exists():
            _warn_if_config_changed(run_dir, cfg)
            logger.info("%s: finished earlier (metrics.json present), skipped", name)
            status[name] = "skipped"
            continue
        logger.info("%s: training (method=%s, flops_target=%s) into %s", name, method, target, run_dir)
        Trainer(cfg, DetectionTask(cfg), run_dir, resume="auto").run()
        status[name] = "done"
    report = None
    if build:
        base_cfg = comparison_config(config, BASELINE, None, data_root, overrides)
        report = build_report(out, base_cfg, expected=[p[0] for p in plan])
    return {"runs": status, "report": report}


def _warn_if_config_changed(run_dir: Path, cfg: dict) -> None:
    stored = run_dir / "config.yaml"
    if not stored.exists():
        return
    try:
        old = load_config(stored, defaults=None)
    except Exception:   # noqa: BLE001 - a broken stored config only loses the warning
        return
    keys = [("train", "epochs"), ("compress", "epoch_es"), ("compress", "flops_target"), ("seed",), ("method",)]
    changed = []
    for k in keys:
        a, b = old, cfg
        for part in k:
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a != b:
            changed.append(f"{'.'.join(k)}: {a!r} (stored) vs {b!r} (now)")
    if changed:
        logger.warning("%s was trained with a different config (%s); delete it to re-run", run_dir,
                       "; ".join(changed))


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


def collect_runs(output_dir) -> dict[str, RunRecord]:
    """Every finished run (a subdirectory holding ``metrics.json``) of ``output_dir``: baseline first, then by
    method and target."""
    out = Path(output_dir)
    if not out.is_dir():
        raise ValueError(f"{out}: output directory not found")
    runs = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        mfile = d / "metrics.json"
        if not mfile.exists():
            continue
        try:
            metrics = json.loads(mfile.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{mfile}: not valid JSON ({e})") from None
        config = {}
        if (d / "config.yaml").exists():
            config = load_config(d / "config.yaml", defaults=None)
        method = metrics.get("method") or config.get("method") or d.name
        target = None if method == BASELINE else (config.get("compress") or {}).get("flops_target")
        pm = json.loads((d / "pm_report.json").read_text(encoding="utf-8")) if (d / "pm_report.json").exists() \
            else None
        epochs: dict[int, dict] = {}
        if (d / "metrics_log.jsonl").exists():
            for rec in read_metrics(d / "metrics_log.jsonl"):
                if rec.get("phase") == "end_epoch" and isinstance(rec.get("epoch"), int):
                    epochs[rec["epoch"]] = rec      # a resumed run may repeat an epoch: the last record wins
        runs.append(RunRecord(d.name, d, method, target, metrics, config, pm, [epochs[e] for e in sorted(epochs)]))
    from edp_det.methods import METHODS

    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (r.method != BASELINE, order.get(r.method, len(order)), r.method,
                             r.target if r.target is not None else -1, r.name))
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
        cache.write_text(json.dumps(res, indent=2, default=float), encoding="utf-8")
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
    """mAP (VOC07) vs achieved backbone FLOPs cut, one curve per method; the baseline at 0 and as a line."""
    curves: dict[str, list[tuple[float, float]]] = {}
    base = None
    for r in runs.values():
        m, cut = r.metrics.get("mAP_voc07"), r.metrics.get("r_flops_backbone")
        if m is None:
            continue
        if r.method == BASELINE:
            base = m
            continue
        if cut is not None:
            curves.setdefault(r.method, []).append((100 * cut, m))
    if not curves and base is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, pts in curves.items():
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=method)
    if base is not None:
        ax.axhline(base, color="k", ls="--", lw=1, label="baseline")
        ax.plot([0], [base], "k*", ms=9)
    ax.set_xlabel("backbone FLOPs cut R_FLOPs (%)")
    ax.set_ylabel("mAP (VOC07, IoU 0.5)")
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
    """Sparse ratio of params (a) and FLOPs (b) per epoch while regularised; the ES epoch dashed."""
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
        es = (r.config.get("compress") or {}).get("epoch_es")
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
    speed figures of ``bench`` where given."""
    return comparison_rows(_metrics_for_table(runs), bench)


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
    figs = {"fig4": plot_map_vs_flops(runs, out / "fig4_map_vs_flops.png"),
            "fig3": plot_sparsity_curves(runs, out / "fig3_sparsity.png")}
    targets = sorted({r.target for r in runs.values() if r.target is not None})
    fig5 = [(t, plot_layerwise(runs, out / f"fig5_layers_{t:g}.png", t), layerwise_methods(runs, t)) for t in targets]
    first = next(iter(runs.values()))
    c = first.config or {}
    tr, cp = c.get("train") or {}, c.get("compress") or {}
    lines = ["# Compression methods compared on one harness", "",
             f"Runs in `{out}`: same detector, data, schedule and seed; every method trains "
             f"{tr.get('epochs', '?')} epochs in total and compresses after epoch `compress.epoch_es` = "
             f"{cp.get('epoch_es', '?')} (regularised before where the method has a regulariser; fine-tuning after, "
             "the LR schedule continuing). Data: `" + str((c.get("data") or {}).get("root")) + "`; model: "
             f"Faster R-CNN ResNet-{(c.get('model') or {}).get('depth', '?')}, input "
             f"{first.metrics.get('input_size', '?')}.", "",
             "## Table (cf. Table XII)", "", format_comparison_table(rows, markdown=True), ""]
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
    path.write_text("\n".join(lines), encoding="utf-8")
    (out / "report_rows.json").write_text(json.dumps(rows, indent=2, default=float), encoding="utf-8")
    logger.info("report: %s", path)
    return path
