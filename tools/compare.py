"""Compare compression methods on one harness: every method at every FLOPs target is trained with the same
detector, data, schedule and seed, then one report is written (tables, mAP-vs-FLOPs curves, layer-wise channels
and ranks, sparsity curves).

examples:
  python tools/compare.py --config configs/raccoon_frcnn_r50_edp.yaml --data-root DIR \
      --methods baseline,edp,l1_filter,slimming,svd,lrs,admm_lrs --flops-targets 0.4,0.6
  python tools/compare.py --config configs/tiny_synthetic.yaml --data-root DIR --methods baseline,edp \
      --flops-targets 0.4 --output-dir runs/cmp train.epochs=2
  python tools/compare.py --config configs/tiny_synthetic.yaml --output-dir runs/cmp --report-only

Runs go to <output-dir>/<method>_<target>/ (the baseline once, <output-dir>/baseline/); finished runs
(metrics.json present) are skipped, interrupted ones resume from their latest checkpoint. --report-only rebuilds
<output-dir>/report.md and the figures from the finished runs without training.
"""
import argparse
from pathlib import Path

from edp_det.harness.cli import cli_main, tool_parser


def get_args_parser():
    p = tool_parser(__doc__)
    p.add_argument("--config", required=True, help="YAML detection config shared by every run")
    p.add_argument("--methods", default="baseline,edp,l1_filter,slimming,svd,lrs,admm_lrs",
                   help="comma-separated methods (see edp_det.methods.METHODS)")
    p.add_argument("--flops-targets", default="0.4,0.6", help="comma-separated backbone FLOPs cuts in (0, 1)")
    p.add_argument("--data-root", default=None, help="dataset root (overrides data.root)")
    p.add_argument("--output-dir", default=None, help="default: runs/compare_<config name>")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    return p


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--flops-targets {text!r}: expected comma-separated numbers, e.g. 0.4,0.6") from None


def main(args):
    from edp_det.harness.compare import build_report, comparison_config, plan_runs, run_comparison
    from edp_det.runtime.logs import setup_logging

    if not Path(args.config).is_file():
        raise ValueError(f"--config {args.config}: file not found")
    out = Path(args.output_dir or Path("runs") / f"compare_{Path(args.config).stem}")
    setup_logging(out, level=args.log_level)
    methods, targets = args.methods.split(","), _floats(args.flops_targets)
    plan = plan_runs(methods, targets)
    if args.report_only:
        cfg = comparison_config(args.config, "baseline", None, args.data_root, args.overrides)
        report = build_report(out, cfg, expected=[p[0] for p in plan])
    else:
        report = run_comparison(args.config, methods, targets, out, data_root=args.data_root,
                                overrides=args.overrides)["report"]
    print(report.read_text(encoding="utf-8").split("## Figures")[0].rstrip())
    print(f"\nreport: {report}")
    return report


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "compare")
