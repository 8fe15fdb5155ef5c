"""Before/after and method-comparison tables (the paper's Table XII layout), built from run metrics."""
from __future__ import annotations

__all__ = ["comparison_rows", "format_comparison_table"]


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
    """One row per run: requested/achieved R_FLOPs, params, FLOPs, FPS, measured vs ideal speedup, mAP, drop.

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
               "mAP_voc07": m.get("mAP_voc07")}
        if base.get("mAP_voc07") is not None and m.get("mAP_voc07") is not None:
            row["mAP_drop"] = base["mAP_voc07"] - m["mAP_voc07"]
        rows.append(row)
    return rows


def _first(*values):
    """The first value that is not None (a side-by-side figure wins over the run's own)."""
    return next((v for v in values if v is not None), None)


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def format_comparison_table(rows: list[dict], markdown: bool = False) -> str:
    """Table XII layout. A column ``R_FLOPs bb dense`` (the cut as executed densely, for methods whose counted
    FLOPs assume sparse kernels: ``lrs``, ``admm_lrs``) is added when any row has that figure."""
    dense_col = any(r.get("r_flops_backbone_dense") is not None for r in rows)
    head = ["run", "R_FLOPs bb (req/got)", "R_FLOPs det", "params (M)", "GFLOPs bb", "GFLOPs det", "FPS det",
            "FPS bb", "speedup bb (meas/ideal)", "speedup det (meas/ideal)", "weights MB", "peak MB", "mAP_voc07", "drop"]
    if dense_col:
        head.insert(2, "R_FLOPs bb dense")
    body = []
    for r in rows:
        req = "-" if r.get("r_flops_requested") is None else f"{r['r_flops_requested']:.0%}"
        body.append([r["run"], f"{req}/{_f(r.get('r_flops_backbone'), '.1%')}", _f(r.get("r_flops_detector"), ".1%"),
                     _f(None if r.get("params") is None else r["params"] / 1e6, ".2f"),
                     _f(None if r.get("flops_backbone") is None else r["flops_backbone"] / 1e9, ".3f"),
                     _f(None if r.get("flops_detector") is None else r["flops_detector"] / 1e9, ".3f"),
                     _f(r.get("fps"), ".1f"), _f(r.get("backbone_fps"), ".1f"),
                     f"{_f(r.get('backbone_speedup'), '.2f')}/{_f(r.get('backbone_ideal_speedup'), '.2f')}",
                     f"{_f(r.get('speedup'), '.2f')}/{_f(r.get('ideal_speedup'), '.2f')}",
                     _f(r.get("model_memory_mb"), ".1f"), _f(r.get("peak_memory_mb"), ".0f"),
                     _f(r.get("mAP_voc07"), ".3f"), _f(r.get("mAP_drop"), "+.3f")])
        if dense_col:
            body[-1].insert(2, _f(r.get("r_flops_backbone_dense"), ".1%"))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])
