"""Compare compression methods on one harness: every method at every FLOPs target is trained with the same
detector, data and schedule, once per seed, then one report is written (mean ± spread over seeds, paired
differences to EDP and to the control with 95 % intervals, tables, mAP-vs-FLOPs curves with error bars, layer-wise
channels and ranks, sparsity curves, the reproducibility record).

examples:
  # the main protocol: compress a trained detector (per seed: baseline trained once, every method starts from it)
  python tools/compare.py --config configs/raccoon_r18_cpu_trained.yaml --data-root ../shared/data/raccoon \
      --start trained --seeds 0,1,2 --jobs 2 --methods baseline,edp,edp_rank,edp_channel,l1_filter,slimming,svd \
      --flops-targets 0.4,0.6
  # every method from scratch, as the paper's Table XII
  python tools/compare.py --config configs/tiny_synthetic.yaml --data-root DIR --methods baseline,edp \
      --flops-targets 0.4 --seeds 0,1 --output-dir runs/cmp train.epochs=2
  python tools/compare.py --config configs/tiny_synthetic.yaml --output-dir runs/cmp --report-only

Runs go to <output-dir>/<method>_<target>/seed<k>/ (baseline/seed<k>/; with --start trained also control/seed<k>/:
the baseline trained on with the compression schedule, without compression); without --seeds to
<output-dir>/<method>_<target>/ with the config's seed. --start trained: per seed the baseline trains with the
config's train schedule, then every other run starts from its model_final.pt and trains with compress.schedule.
Finished runs (metrics.json present) are skipped, interrupted ones resume from their latest checkpoint, a failed
run is listed in the summary (error line, log) while the others go on. <output-dir>/grid.json records the grid's
config hash: a folder holding a grid made with another config is refused. --report-only rebuilds
<output-dir>/report.md and the figures from the finished runs without training.
"""
import shlex
import sys
from pathlib import Path

from edp_det.harness.cli import cli_main, tool_parser


def get_args_parser():
    p = tool_parser(__doc__)
    p.add_argument("--config", required=True, help="YAML detection config shared by every run")
    p.add_argument("--methods", default="baseline,edp,l1_filter,slimming,svd,lrs,admm_lrs",
                   help="comma-separated methods (see edp_det.methods.METHODS)")
    p.add_argument("--flops-targets", default="0.4,0.6", help="comma-separated backbone FLOPs cuts in (0, 1)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, one run of every (method, target) per seed (default: the config's "
                        "seed, runs without seed folders)")
    p.add_argument("--start", default="scratch", choices=("scratch", "trained"),
                   help="scratch: every run trains from the config's initialisation; trained: compress the seed's "
                        "trained baseline with compress.schedule (plus a control run)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once (>1: subprocesses, each with cores/jobs threads)")
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
    from edp_det.harness.compare import build_report, comparison_config, parse_seeds, plan_grid, run_comparison
    from edp_det.runtime.logs import setup_logging

    if not Path(args.config).is_file():
        raise ValueError(f"--config {args.config}: file not found")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be at least 1")
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    methods, targets = args.methods.split(","), _floats(args.flops_targets)
    plan, _ = plan_grid(methods, targets, seeds, args.start)
    out = Path(args.output_dir or Path("runs") / f"compare_{Path(args.config).stem}")
    if args.report_only and not out.is_dir():
        raise ValueError(f"--report-only: {out} is not a folder of a grid (--output-dir names the grid to report on)")
    setup_logging(out, level=args.log_level)
    if args.report_only:
        cfg = comparison_config(args.config, "baseline", None, args.data_root, args.overrides)
        report = build_report(out, cfg, expected=[r.name for r in plan])
        failed = {}
    else:
        command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        res = run_comparison(args.config, methods, targets, out, data_root=args.data_root, overrides=args.overrides,
                             seeds=seeds, start=args.start, jobs=args.jobs, command=command)
        report, failed = res["report"], res["failed"]
        for note in res["notes"]:
            print(note)
    print(report.read_text(encoding="utf-8").split("## Figures")[0].rstrip())
    print(f"\nreport: {report}")
    for name, f in failed.items():
        print(f"FAILED {name}: {f['error']} (log: {f['log']})")
    if failed:
        from edp_det.train.engine import TrainingError

        raise TrainingError(f"{len(failed)} run(s) of the grid did not finish: {', '.join(failed)} (see the summary)")
    return report


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "compare")
