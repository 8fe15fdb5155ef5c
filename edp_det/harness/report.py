"""Before/after and method-comparison tables (the figures of the paper's Table XII), built from run metrics.

:func:`format_comparison_table` lays the figures out as three tables that each fit 120 columns — accuracy
(mAP and its change against the baseline), size (FLOPs cut, params, FLOPs, weights) and speed (FPS, measured and
FLOPs-ideal speedups, peak inference memory) — followed by notes that say what the less obvious columns measure.
"""
from __future__ import annotations

__all__ = ["comparison_rows", "format_comparison_table", "seed_summary", "format_seed_table", "format_paired_table",
           "verdict_sentence", "ACCURACY_KEYS"]


_SPEEDUP_KEYS = {"speedup": "detector_measured", "ideal_speedup": "detector_ideal",
                 "backbone_speedup": "backbone_measured", "backbone_ideal_speedup": "backbone_ideal"}


def _speed(bench: dict | None, name: str) -> dict:
    """Per-model figures of a compare_side_by_side result, with its ``speedup[name]`` entries under the row keys
    (``speedup``/``ideal_speedup``: detector, ``backbone_speedup``/``backbone_ideal_speedup``)."""
    if not bench:
        return {}
    out = dict((bench.get("models") or {}).get(name, {}))
    sp = (bench.get("speedup") or {}).get(name) or {}
    for row_key, bench_key in _SPEEDUP_KEYS.items():
        if row_key not in out and bench_key in sp:
            out[row_key] = sp[bench_key]
    return out


def comparison_rows(metrics: dict[str, dict], bench: dict | None = None, baseline: str = "baseline") -> list[dict]:
    """One row per run: requested/achieved R_FLOPs, params, FLOPs, FPS, measured vs ideal speedup, mAP and
    ``mAP_delta`` = mAP − baseline mAP (negative: worse than the baseline).

    ``metrics``: run name -> its metrics.json; ``bench``: the result of
    :func:`edp_det.deploy.benchmark.compare_side_by_side` over the same runs (optional).
    """
    base = metrics.get(baseline, {})
    rows = []
    for name, m in metrics.items():
        s = _speed(bench, name)
        row = {"run": name, "method": m.get("method", name),
               "r_flops_requested": (m.get("config", {}) or {}).get("compress", {}).get("flops_target")
               if m.get("method") not in (None, "baseline") else None,
               "r_flops_backbone": m.get("r_flops_backbone"), "r_flops_detector": m.get("r_flops_detector"),
               "r_flops_backbone_dense": m.get("r_flops_backbone_dense"),
               "params": m.get("params"), "flops_backbone": m.get("flops_backbone"),
               "flops_detector": m.get("flops_detector"),
               "fps": s.get("fps", m.get("fps")), "backbone_fps": s.get("backbone_fps", m.get("backbone_fps")),
               "speedup": s.get("speedup"), "ideal_speedup": s.get("ideal_speedup"),
               "backbone_speedup": s.get("backbone_speedup"), "backbone_ideal_speedup": s.get("backbone_ideal_speedup"),
               "peak_memory_mb": _first(s.get("peak_memory_mb"), m.get("peak_memory_mb")),
               "model_memory_mb": _first(s.get("model_memory_mb"), m.get("model_memory_mb")),
               "mAP_voc07": m.get("mAP_voc07"), "mAP_area": m.get("mAP_area"), "coco_ap": m.get("coco_ap")}
        if base.get("mAP_voc07") is not None and m.get("mAP_voc07") is not None:
            row["mAP_delta"] = m["mAP_voc07"] - base["mAP_voc07"]
        rows.append(row)
    return rows


def _first(*values):
    """The first value that is not None (a side-by-side figure wins over the run's own)."""
    return next((v for v in values if v is not None), None)


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


MAX_WIDTH = 120

NOTES = {
    "delta": "Δ mAP: mAP_voc07 of the run minus that of the baseline; negative = less accurate than the baseline.",
    "r_flops": "R_FLOPs: FLOPs cut vs the uncompressed detector (bb: ResNet backbone body, det: whole detector), "
               "requested / achieved.",
    "dense": "bb dense: the backbone FLOPs cut as the model actually runs (one dense conv per layer), for methods whose "
             "counted FLOPs assume sparse kernels (lrs, admm_lrs).",
    "speedup": "speedup: latency of the baseline / latency of the run, measured next to the FLOPs-ideal ratio "
               "(meas / ideal).",
    "peak": "peak MB: extra memory (MiB) one inference of one image needs on top of the loaded model (CUDA: "
            "peak allocated; CPU: peak resident set of a fresh process); weights MB: parameters and buffers.",
}


def describe_run(row: dict) -> str:
    """What a row is: ``original (uncompressed)`` for the baseline, else ``compressed: <method>, <R>% FLOPs
    target``."""
    if row.get("method") in (None, "baseline"):
        return "original (uncompressed)"
    req = row.get("r_flops_requested")
    return f"compressed: {row.get('method')}" + ("" if req is None else f", {req:.0%} FLOPs target")


def _speedup(r: dict, measured: str, ideal: str) -> str:
    return f"{_f(r.get(measured), '.2f')} / {_f(r.get(ideal), '.2f')}"


def _table(title: str, head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
            ["| " + " | ".join(b) + " |" for b in body]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return [title] + [fmt.format(*b).rstrip() for b in [head, ["-" * w for w in widths], *body]]


def _wrap(text: str, width: int = MAX_WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent="  ")


def format_comparison_table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as an accuracy, a size and a speed table (each at most :data:`MAX_WIDTH` characters wide in plain
    text; the speed table only when some row has a speed figure), followed by notes on the columns. A column
    ``bb dense`` (the backbone cut as executed densely) is added to the size table when any row has that figure."""
    dense_col = any(r.get("r_flops_backbone_dense") is not None for r in rows)
    acc = [[r["run"], describe_run(r), _f(r.get("mAP_voc07"), ".3f"), _f(r.get("mAP_delta"), "+.3f")]
           for r in rows]
    size_head = ["run", "R_FLOPs bb req/got", "R_FLOPs det", "params M", "GFLOPs bb", "GFLOPs det", "weights MB"]
    size = []
    for r in rows:
        req = "-" if r.get("r_flops_requested") is None else f"{r['r_flops_requested']:.0%}"
        size.append([r["run"], f"{req} / {_f(r.get('r_flops_backbone'), '.1%')}", _f(r.get("r_flops_detector"), ".1%"),
                     _f(None if r.get("params") is None else r["params"] / 1e6, ".2f"),
                     _f(None if r.get("flops_backbone") is None else r["flops_backbone"] / 1e9, ".3f"),
                     _f(None if r.get("flops_detector") is None else r["flops_detector"] / 1e9, ".3f"),
                     _f(r.get("model_memory_mb"), ".1f")])
        if dense_col:
            size[-1].insert(2, _f(r.get("r_flops_backbone_dense"), ".1%"))
    if dense_col:
        size_head.insert(2, "bb dense")
    speed_keys = ("fps", "backbone_fps", "speedup", "backbone_speedup", "peak_memory_mb")
    has_speed = any(r.get(k) is not None for r in rows for k in speed_keys)
    speed = [[r["run"], _f(r.get("fps"), ".1f"), _f(r.get("backbone_fps"), ".1f"),
              _speedup(r, "speedup", "ideal_speedup"), _speedup(r, "backbone_speedup", "backbone_ideal_speedup"),
              _f(r.get("peak_memory_mb"), ".0f")] for r in rows]
    blank = [""]
    lines = _table("Accuracy", ["run", "model", "mAP_voc07", "Δ mAP"], acc, markdown) + blank
    lines += _table("Size", size_head, size, markdown) + blank
    if has_speed:
        lines += _table("Speed", ["run", "FPS det", "FPS bb", "speedup det meas / ideal",
                                  "speedup bb meas / ideal", "peak MB"], speed, markdown) + blank
    notes = [NOTES["delta"], NOTES["r_flops"]] + ([NOTES["dense"]] if dense_col else []) + \
        ([NOTES["speedup"], NOTES["peak"]] if has_speed else [])
    for n in notes:
        lines += [f"* {n}"] if markdown else _wrap(f"* {n}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ over seeds
#: accuracy figures summarised over seeds (those present in the runs' metrics)
ACCURACY_KEYS = ("mAP_voc07", "mAP_area", "coco_ap")
SIZE_KEYS = ("r_flops_backbone", "params", "flops_backbone", "flops_detector", "fps", "backbone_speedup",
             "backbone_ideal_speedup")


def seed_summary(groups: dict[str, list[dict]]) -> list[dict]:
    """One row per group (a method at a target): ``{"group", "method", "target", "n", "seeds", <key>: Spread}``
    for every key of :data:`ACCURACY_KEYS` and :data:`SIZE_KEYS` that some run has. ``groups``: group name → its
    runs' table rows (:func:`comparison_rows`, with ``seed``)."""
    from edp_det.harness.stats import spread

    out = []
    for group, rows in groups.items():
        row = {"group": group, "method": rows[0].get("method"), "target": rows[0].get("r_flops_requested"),
               "n": len(rows), "seeds": [r.get("seed") for r in rows]}
        for k in ACCURACY_KEYS + SIZE_KEYS:
            row[k] = spread(r.get(k) for r in rows)
        out.append(row)
    return out


def _pm(sp, fmt: str, scale: float = 1.0) -> str:
    return "-" if sp is None else f"{format(sp.mean / scale, fmt)} ± {format(sp.std / scale, fmt)}"


def format_seed_table(summary: list[dict], markdown: bool = True) -> str:
    """Mean ± standard deviation over seeds per group, n, min–max of mAP_voc07, achieved R_FLOPs, params, FLOPs,
    FPS and the backbone's measured speed-up (each run against the baseline of its seed) with the FLOPs-ideal one."""
    acc_keys = [k for k in ACCURACY_KEYS if any(r.get(k) is not None for r in summary)]
    head = ["group", "n"] + [f"{k} mean ± std" for k in acc_keys] + ["mAP_voc07 min–max", "R_FLOPs bb",
                                                                    "params M", "GFLOPs bb", "GFLOPs det", "FPS",
                                                                    "speed-up bb meas / ideal"]
    body = []
    for r in summary:
        m = r.get("mAP_voc07")
        body.append([r["group"], str(r["n"])] + [_pm(r.get(k), ".3f") for k in acc_keys] +
                    ["-" if m is None else f"{m.min:.3f}–{m.max:.3f}",
                     _f(None if r.get("r_flops_backbone") is None else r["r_flops_backbone"].mean, ".1%"),
                     _f(None if r.get("params") is None else r["params"].mean / 1e6, ".2f"),
                     _f(None if r.get("flops_backbone") is None else r["flops_backbone"].mean / 1e9, ".3f"),
                     _f(None if r.get("flops_detector") is None else r["flops_detector"].mean / 1e9, ".3f"),
                     _pm(r.get("fps"), ".1f"),
                     "-" if r.get("backbone_speedup") is None or r.get("backbone_ideal_speedup") is None else
                     f"{_pm(r['backbone_speedup'], '.2f')} / {r['backbone_ideal_speedup'].mean:.2f}"])
    return "\n".join(_table("Over seeds", head, body, markdown))


def format_paired_table(title: str, diffs: list[tuple[str, object]], markdown: bool = True,
                        resolve: float = 0.01) -> str:
    """Paired differences (:class:`edp_det.harness.stats.PairedDifference`, mAP_voc07 of a group minus the
    reference's, same seeds): mean, the 95 % interval, n, the verdict, the smallest difference these seeds find with
    80 % power (:func:`~edp_det.harness.stats.detectable_difference`) and the seeds a difference of ``resolve``
    needs (:func:`~edp_det.harness.stats.seeds_needed`), both at the spread the differences showed."""
    from edp_det.harness.stats import POWER, SEEDS_LIMIT, verdict

    body = []
    for group, d in diffs:
        if d is None:
            body.append([group, "-", "-", "0", "undetermined", "-", "-"])
            continue
        interval = "-" if d.half_width is None else f"[{d.low:+.3f}, {d.high:+.3f}]"
        detect = d.detectable()
        need = d.seeds_for(resolve)
        body.append([group, f"{d.mean:+.3f}", interval, str(d.n), verdict(d),
                     "-" if detect is None else f"±{detect:.3f}",
                     "-" if d.n < 2 else (f"> {SEEDS_LIMIT}" if need is None else str(need))])
    head = ["group", "mean Δ mAP_voc07", "95 % interval", "n seeds", "verdict",
            f"detectable Δ ({100 * POWER:.0f} % power)", f"seeds for ±{resolve:.3f}"]
    return "\n".join(_table(title, head, body, markdown))


def verdict_sentence(target_text: str, reference: str, diffs: list[tuple[str, object]]) -> str:
    """A plain sentence: which groups are better / worse than ``reference`` beyond the interval and which are
    indistinguishable (or undetermined: fewer than two shared seeds)."""
    from edp_det.harness.stats import verdict

    by: dict[str, list[str]] = {}
    for group, d in diffs:
        by.setdefault(verdict(d), []).append(group)
    parts = []
    for key, text in (("better", f"better than {reference} beyond the 95 % interval"),
                      ("worse", f"worse than {reference} beyond the 95 % interval"),
                      ("indistinguishable", f"indistinguishable from {reference} (the interval holds 0)"),
                      ("undetermined", "undetermined (fewer than two shared seeds)")):
        if by.get(key):
            parts.append(f"{', '.join(by[key])} {'is' if len(by[key]) == 1 else 'are'} {text}")
    return f"{target_text}: " + ("; ".join(parts) if parts else "nothing to compare") + "."
