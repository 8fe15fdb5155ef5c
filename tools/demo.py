"""The main job on the built-in synthetic dataset: generate it, train a baseline detector, compress it with EDP to
a 40% backbone FLOPs cut, train an uncompressed control for as long, benchmark baseline and EDP side by side and
print the before/after tables.

examples:
  python tools/demo.py
  python tools/demo.py --output-dir runs/demo --num-train 300 --num-test 100
  python tools/demo.py --output-dir runs/demo_quick --num-train 8 --num-test 4 train.epochs=2 \
      train.max_iters_per_epoch=2 benchmark.iters=1

The runs are a comparison (edp_det.harness.compare, the trained-start protocol of tools/compare.py --start trained)
of configs/demo_synthetic_trained.yaml: <output-dir>/baseline/ trains from scratch; <output-dir>/edp/ compresses its
model_final.pt with the compression schedule (regularised epochs, PM, fine-tuning) and <output-dir>/control/ trains
it on for the same schedule without compression, the reference EDP's accuracy is judged against. Finished runs are
reused and interrupted ones resume (delete the output directory to start over); a run that fails ends the demo with
one line naming it and its log (exit 1). Trains and measures on CUDA when available, else on the CPU (--device
chooses). Writes <output-dir>/demo_report.md and demo_bench.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edp_det.harness.cli import cli_main, tool_parser

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_synthetic_trained.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--output-dir", default="runs/demo", help="folder of the dataset, both runs and the report")
    p.add_argument("--num-train", type=int, default=300, help="synthetic training images")
    p.add_argument("--num-test", type=int, default=100, help="synthetic test images")
    p.add_argument("--image-size", type=int, default=192, help="square image side in pixels")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs, key=value")
    return p


def main(args: argparse.Namespace) -> list[dict]:
    from edp_det.data.synthetic import make_synthetic_voc
    from edp_det.harness.cli import resolve_device
    from edp_det.harness.compare import (check_grid, collect_runs, comparison_config, grid_record,
                                         measure_side_by_side, report_rows, run_comparison)
    from edp_det.harness.report import format_comparison_table
    from edp_det.runtime.checkpoint import atomic_write_text
    from edp_det.runtime.logs import setup_logging

    out = Path(args.output_dir)
    device = resolve_device(args.device)
    data = out / "data"
    overrides = [*args.overrides, f"device={device}"]
    cfg = comparison_config(CONFIG, "baseline", None, data, overrides)
    # before anything is written: a folder holding another grid (e.g. the from-scratch demo) is refused
    check_grid(out, grid_record(cfg, "trained"), CONFIG)
    setup_logging(out)
    if not (data / "ImageSets" / "Main" / "test.txt").exists():
        make_synthetic_voc(data, num_train=args.num_train, num_test=args.num_test, image_size=args.image_size, seed=0)
    target = cfg["compress"]["flops_target"]
    res = run_comparison(CONFIG, ["baseline", "edp"], [target], out, data_root=data, overrides=overrides,
                         build=False, name_by_method=True, start="trained")
    unfinished = [n for n, status in res["runs"].items() if status not in ("done", "skipped")]
    if unfinished:
        from edp_det.train.engine import TrainingError

        why = "; ".join(f"{n}: {res['failed'][n]['error']} (log: {res['failed'][n]['log']})" if n in res["failed"]
                        else f"{n}: {res['runs'][n]}" for n in unfinished)
        raise TrainingError(f"{len(unfinished)} run(s) of the demo did not finish: {why}")
    runs = {n: r for n, r in collect_runs(out).items() if n in ("baseline", "control", "edp")}
    timed = {n: r for n, r in runs.items() if n != "control"}    # the control has the baseline's architecture
    bench = measure_side_by_side(timed, cfg, cache=out / "demo_bench_as_trained.json")
    # the inference form: norm layers folded, low-rank pairs merged where measured faster (same weights)
    bench_opt = measure_side_by_side(timed, cfg, cache=out / "demo_bench_inference_form.json", optimize=True)
    rows = report_rows(runs, bench)
    if bench_opt:
        for row in report_rows(timed, bench_opt):
            row["run"] += " (inference form)"
            rows.append(row)
    atomic_write_text(format_comparison_table(rows, markdown=True) + "\n", out / "demo_report.md")
    atomic_write_text(json.dumps({"as_trained": bench, "inference_form": bench_opt}, indent=2, default=float),
                      out / "demo_bench.json")
    print(f"\nEDP demo (synthetic shapes, Faster R-CNN R18-FPN trained, then compressed, {device}):")
    print(format_comparison_table(rows))
    b, c, e = (runs[n].metrics["mAP_voc07"] for n in ("baseline", "control", "edp"))
    print(f"\nmAP_voc07: baseline {b:.3f}; after the compression schedule: control (not compressed) {c:.3f}, EDP "
          f"{e:.3f} (EDP - control {e - c:+.3f}); backbone FLOPs cut {runs['edp'].metrics['r_flops_backbone']:.1%}. "
          f"Report: {out / 'demo_report.md'}")
    pm = out / "edp" / "pm_report.json"
    if pm.exists():
        share = json.loads(pm.read_text(encoding="utf-8")).get("r_flops_from_zero_groups", 0.0)
        print(f"groups trained to exactly zero cut {share:.1%} of the backbone FLOPs at PM (target {target:.0%})")
    return rows


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "demo")
