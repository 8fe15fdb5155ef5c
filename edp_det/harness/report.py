"""Before/after and method-comparison tables (the figures of the paper's Table XII), built from run metrics.

:func:`format_comparison_table` lays the figures out as three tables that each fit 120 columns — accuracy
(mAP and its change against the baseline), size (FLOPs cut, params, FLOPs, weights) and speed (FPS, measured and
FLOPs-ideal speedups, peak inference memory) — followed by notes that say what the less obvious columns measure.
"""
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
               "mAP_voc07": m.get("mAP_voc07")}
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
