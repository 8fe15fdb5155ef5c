"""Benchmark a compressed detector side by side with its baseline: latency and FPS (backbone body, and the full
detector with pre- and post-processing), params, FLOPs, peak inference memory, and the measured speedup next to
the FLOPs-ideal speedup.

examples:
  python tools/benchmark.py --model runs/x/model_final.pt --baseline runs/base/model_final.pt
  python tools/benchmark.py --model runs/x/model_final.pt --input-size 512 512 --device cuda --output-json b.json
  python tools/benchmark.py --model runs/x/model_final.pt --baseline runs/base/model_final.pt --optimize

Runs on CUDA when available, else on the CPU (--device chooses). Models are measured alternately (round-robin)
so that machine noise hits each equally. --input-size is the size of the image as the network sees it (default:
the model's min_size square, which the detector's transform leaves unresized). --output-json refuses an existing
file unless --overwrite is given, and always refuses a model file or a training run's own files (its
metrics.json). Bad input (missing file, not an edp-det model file, not a detector) prints one error line and exits
with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os

from edp_det.harness.cli import INTERRUPTED_ATOMIC, cli_main, tool_parser

logger = logging.getLogger("benchmark")


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--model", required=True, help="compressed model file (edp_det.save_compressed format)")
    p.add_argument("--baseline", default=None,
                   help="baseline model file (e.g. the uncompressed detector, saved with save_compressed); the "
                        "speedups are relative to it")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="network input size (default: min_size x min_size of the model's transform)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per model per round")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per model before the first round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--optimize", action="store_true",
                   help="time the inference form of both models (edp_det.deploy.inference.optimize_for_inference on "
                        "the backbone body: norm layers folded, low-rank pairs merged where measured faster)")
    p.add_argument("--output-json", default=None, help="also write the full result as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace the --output-json file if it exists")
    return p


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark; prints the table and returns the result dict."""
    import torch

    from edp_det.deploy.benchmark import compare_side_by_side, default_input_size, format_comparison
    from edp_det.harness.cli import check_output_file, load_detector, resolve_device, write_json
    from edp_det.runtime.errors import ConfigError

    for flag, v, lo in (("--iters", args.iters, 1), ("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0)):
        if v < lo:
            raise ConfigError(f"{flag}: must be >= {lo}, got {v}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise ConfigError(f"--input-size: must be positive, got {args.input_size}")
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    paths = {}
    if args.baseline is not None:
        paths["baseline"] = args.baseline
    paths["model"] = args.model
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise ConfigError(f"--{name}: file not found: {path}")
    if args.output_json:
        check_output_file(args.output_json, "--output-json", overwrite=args.overwrite,
                          inputs=[(f"--{name}", path) for name, path in paths.items()])
    models = {name: load_detector(path, f"--{name}") for name, path in paths.items()}
    if args.input_size is not None:
        input_size = (3, *args.input_size)
    else:
        input_size = default_input_size(models["model"])
    result = compare_side_by_side(models, input_size=input_size, device=device, rounds=args.rounds,
                                  iters_per_round=args.iters, warmup=args.warmup,
                                  peak_memory=not args.no_memory,
                                  model_paths=paths if device.type == "cpu" else None, optimize=args.optimize)
    result["files"] = {name: str(path) for name, path in paths.items()}
    print(format_comparison(result))
    for name, path in paths.items():
        print(f"  {name}: {path}")
    if args.output_json:
        print(f"wrote {write_json(result, args.output_json)}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli_main(main, get_args_parser().parse_args(), "benchmark", interrupted=INTERRUPTED_ATOMIC)
