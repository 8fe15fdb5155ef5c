"""Export a compressed detector to ONNX or TorchScript for deployment (see docs/EXPORT.md).

examples:
  python tools/export.py --model runs/x/model_final.pt --format onnx
  python tools/export.py --model runs/x/model_final.pt --format torchscript --part backbone --output bb.pt
  python tools/export.py --model runs/x/model_final.pt --format onnx --dynamic --verify

--part detector (default) exports the whole Faster R-CNN with pre- and post-processing (one image [C, H, W] in;
boxes, labels, scores out); if that fails the backbone + FPN is exported instead and the output says so.
--part backbone exports model.backbone (ResNet body + FPN). --verify compares the exported file with PyTorch on a
random image (ONNX via onnxruntime), on CUDA when available, else on the CPU (--device chooses). Bad input prints
one error line and exits with status 2; a model that cannot be exported, or a failed --verify, exits with 1.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from edp_det.harness.cli import cli_main, tool_parser

logger = logging.getLogger("export")

_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--model", required=True, help="compressed model file (edp_det.save_compressed format)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--output", default=None,
                   help="output file (default: next to --model, <stem>[.backbone].onnx / .torchscript.pt)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="example image size (default: min_size x min_size of the model's transform)")
    p.add_argument("--part", choices=["detector", "backbone"], default="detector",
                   help="whole detector with pre/post-processing, or backbone + FPN only")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 11)")
    p.add_argument("--dynamic", action="store_true", help="ONNX: dynamic image height/width (and backbone batch)")
    p.add_argument("--no-fallback", action="store_true",
                   help="fail instead of exporting the backbone + FPN when the detector cannot be exported")
    p.add_argument("--verify", action="store_true",
                   help="compare the exported file with PyTorch on a random image (rtol 1e-3, atol 1e-4)")
    p.add_argument("--device", default=None,
                   help="device the model is traced and verified on (default: cuda if available, else cpu)")
    return p


def main(args: argparse.Namespace):
    """Export; prints the summary and returns the ExportResult."""
    from edp_det import load_compressed
    from edp_det.deploy.benchmark import default_input_size
    from edp_det.harness.cli import resolve_device
    from edp_det.runtime.errors import ConfigError
    from edp_det.deploy.export import export_onnx, export_torchscript, verify_onnx, verify_torchscript

    if not os.path.isfile(args.model):
        raise ConfigError(f"--model: file not found: {args.model}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise ConfigError(f"--input-size: must be positive, got {args.input_size}")
    if args.opset < 11:
        raise ConfigError(f"--opset: must be >= 11 for detection models, got {args.opset}")
    device = resolve_device(args.device)
    model = load_compressed(args.model).to(device)
    if not all(hasattr(model, a) for a in ("backbone", "rpn", "roi_heads", "transform")):
        raise ConfigError(f"{args.model}: a {model.edp_arch['name']!r} model, not a detector")
    input_size = (3, *args.input_size) if args.input_size is not None else default_input_size(model)
    if args.output is not None:
        out = Path(args.output)
    else:
        src = Path(args.model)
        stem = src.stem + (".backbone" if args.part == "backbone" else "")
        out = src.with_name(stem + _SUFFIX[args.format])
    if args.format == "onnx":
        res = export_onnx(model, out, input_size, args.part, opset=args.opset, dynamic=args.dynamic,
                          fallback=not args.no_fallback)
    else:
        res = export_torchscript(model, out, input_size, args.part, fallback=not args.no_fallback)
    print(res.summary())
    if args.verify:
        check = verify_onnx(res, model) if args.format == "onnx" else verify_torchscript(res, model)
        status = "OK" if check["ok"] else f"MISMATCH ({check['reason']})"
        diff = "-" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.3g}"
        print(f"  verify: {status}; max |exported - pytorch| = {diff} over {check['num_outputs']} outputs")
        if not check["ok"]:
            raise SystemExit(1)
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli_main(main, get_args_parser().parse_args(), "export")
