"""The main job on the built-in synthetic dataset: generate it, train the baseline detector and its EDP version
at a 40% backbone FLOPs target with the same schedule, benchmark both side by side and print one before/after
table. Finished runs are reused (delete the output directory to start over).

    python tools/demo.py [--output-dir runs/demo] [--num-train 300 --num-test 100] [key=value ...]
"""
import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs, key=value")
    return p


def main(args):
    from edp_det.data.synthetic import make_synthetic_voc
    from edp_det.harness.run_config import resolve_config
    from edp_det.train.detection import DetectionTask
    from edp_det.train.engine import Trainer
    from edp_det.runtime.logs import setup_logging
    from edp_det.harness.report import comparison_rows, format_comparison_table

    out = Path(args.output_dir)
    setup_logging(out)
    data = out / "data"
    if not (data / "ImageSets" / "Main" / "test.txt").exists():
        make_synthetic_voc(data, num_train=args.num_train, num_test=args.num_test, image_size=args.image_size, seed=0)
    metrics = {}
    cfgs = {}
    for name in ("baseline", "edp"):
        run = out / name
        cfg = resolve_config(REPO / "configs" / f"demo_synthetic_{name}.yaml",
                             [*args.overrides, f"device={args.device}"], task="detection", output_dir=run,
                             data_root=data)
        cfgs[name] = cfg
        done = run / "metrics.json"
        if not done.exists():
            resume = "auto" if (run / "last_checkpoint").exists() else None
            Trainer(cfg, DetectionTask(cfg), run, resume=resume).run()
        metrics[name] = json.loads(done.read_text())
        metrics[name]["config"] = cfg
    from edp_det import load_compressed
    from edp_det.deploy.benchmark import compare_side_by_side

    models = {n: load_compressed(out / n / "model_final.pt") for n in ("baseline", "edp")}
    size = tuple(metrics["baseline"]["input_size"])
    bench = compare_side_by_side(models, input_size=size, device=args.device, peak_memory=True,
                                 model_paths={n: str(out / n / "model_final.pt") for n in models})
    # the inference form: norm layers folded, low-rank pairs merged where measured faster (same weights)
    bench_opt = compare_side_by_side(models, input_size=size, device=args.device, optimize=True)
    rows = comparison_rows(metrics, bench)
    for row in comparison_rows(metrics, bench_opt):
        row["run"] += " (inference form)"
        rows.append(row)
    table = format_comparison_table(rows)
    (out / "demo_report.md").write_text(format_comparison_table(rows, markdown=True) + "\n")
    (out / "demo_bench.json").write_text(json.dumps({"as_trained": bench, "inference_form": bench_opt}, indent=2,
                                                    default=float))
    print("\nEDP demo (synthetic shapes, Faster R-CNN R18-FPN from scratch, CPU):")
    print(table)
    b, e = metrics["baseline"]["mAP_voc07"], metrics["edp"]["mAP_voc07"]
    print(f"\nbaseline mAP_voc07 {b:.3f}, EDP {e:.3f} ({e - b:+.3f}); backbone FLOPs cut "
          f"{metrics['edp']['r_flops_backbone']:.1%}. Report: {out / 'demo_report.md'}")
    return rows


if __name__ == "__main__":
    from edp_det.harness.cli import cli_main

    cli_main(main, get_args_parser().parse_args(), "demo")
