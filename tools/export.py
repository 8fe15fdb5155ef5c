"""Export a compressed detector to ONNX or TorchScript for deployment (see docs/EXPORT.md).

examples:
  python tools/export.py --model runs/x/model_final.pt --format onnx
  python tools/export.py --model runs/x/model_final.pt --format torchscript --part backbone --output bb.pt
  python tools/export.py --model runs/x/model_final.pt --format onnx --verify --data-root data/VOC2007
  python tools/export.py --model runs/x/model_final.pt --format onnx --verify --verify-images a.jpg b.jpg

--part detector (default) exports the whole Faster R-CNN with pre- and post-processing (one image [C, H, W] in;
boxes, labels, scores out); if that fails the backbone + FPN is exported instead and the output says so.
--part backbone exports model.backbone (ResNet body + FPN). ONNX files take any image size unless --static (which
specialises the graph to --input-size and makes ONNX Runtime reject every other size).
--verify runs the exported file (ONNX via onnxruntime) and PyTorch on real images (--verify-images, or the first
--verify-count images of --split in the VOC folder --data-root) and states the largest box and score differences;
it needs detections on at least one image: where PyTorch detects nothing the check is void and fails. Without
images a random one is used, which a trained detector usually finds nothing in. The model runs on CUDA when
available, else on the CPU (--device chooses).

--output names a file (default: next to --model); a folder, the --model file itself or a file of a training run
is refused, and so is an existing file unless --overwrite is given. The file is written in full or not at all,
also on Ctrl-C. Options that would do nothing are errors: ONNX-only ones (--opset, --static, --dynamic) with
--format torchscript, --verify-images / --data-root without --verify, --split / --verify-count without
--data-root. Bad input prints one error line and exits with status 2; a model that cannot be exported, or a failed
or void --verify, exits with 1.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from edp_det.harness.cli import INTERRUPTED_ATOMIC, cli_main, tool_parser

logger = logging.getLogger("export")

_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--model", required=True, help="compressed model file (edp_det.save_compressed format)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--output", default=None,
                   help="output file, not a folder (default: next to --model, <stem>[.backbone].onnx / "
                        ".torchscript.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="example image size (default: min_size x min_size of the model's transform)")
    p.add_argument("--part", choices=["detector", "backbone"], default="detector",
                   help="whole detector with pre/post-processing, or backbone + FPN only")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: 17; from 11 to the highest the installed torch exports)")
    p.add_argument("--static", action="store_true",
                   help="ONNX: specialise the graph to --input-size (other image sizes are then rejected)")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX: dynamic image height/width and backbone batch (the default; kept for old scripts)")
    p.add_argument("--no-fallback", action="store_true",
                   help="fail instead of exporting the backbone + FPN when the detector cannot be exported")
    p.add_argument("--verify", action="store_true",
                   help="compare the exported file with PyTorch on real images (rtol 1e-3, atol 1e-4); fails when "
                        "the model detects nothing on them")
    p.add_argument("--verify-images", nargs="+", default=None, metavar="PATH", help="images for --verify")
    p.add_argument("--data-root", default=None, help="VOC folder whose --split images --verify uses")
    p.add_argument("--split", default=None, help="split of --data-root for --verify (default: test)")
    p.add_argument("--verify-count", type=int, default=None,
                   help="how many --data-root images --verify uses (default: 4)")
    p.add_argument("--device", default=None,
                   help="device the model is traced and verified on (default: cuda if available, else cpu)")
    return p


def main(args: argparse.Namespace):
    """Export; prints the summary and returns the ExportResult."""
    from edp_det.deploy.benchmark import default_input_size
    from edp_det.deploy.export import DEFAULT_OPSET, export_onnx, export_torchscript
    from edp_det.harness.cli import check_output_file, load_detector, resolve_device
    from edp_det.runtime.errors import ConfigError

    _check_flags(args)
    if not os.path.isfile(args.model):
        raise ConfigError(f"--model: file not found: {args.model}")
    if args.input_size is not None and min(args.input_size) < 1:
        raise ConfigError(f"--input-size: must be positive, got {args.input_size}")
    if args.output is not None:
        out = check_output_file(args.output, "--output", overwrite=args.overwrite, inputs=[("--model", args.model)])
    else:
        src = Path(args.model)
        stem = src.stem + (".backbone" if args.part == "backbone" else "")
        out = check_output_file(src.with_name(stem + _SUFFIX[args.format]), "output (next to --model)",
                                overwrite=args.overwrite)
    device = resolve_device(args.device)
    model = load_detector(args.model, "--model").to(device)
    input_size = (3, *args.input_size) if args.input_size is not None else default_input_size(model)
    images = _verify_images(args) if args.verify else None   # bad image paths fail before the export
    if args.format == "onnx":
        res = export_onnx(model, out, input_size, args.part, opset=DEFAULT_OPSET if args.opset is None else args.opset,
                          dynamic=not args.static, fallback=not args.no_fallback)
    else:
        res = export_torchscript(model, out, input_size, args.part, fallback=not args.no_fallback)
    print(res.summary())
    if args.verify:
        _verify(res, model, images)
    return res


def _given(args, *names) -> list[str]:
    """The flags among ``names`` (argparse destinations) that were given (not None / not False)."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _check_flags(args) -> None:
    """Flags that would do nothing in this combination, and values the exporter cannot take, before any work."""
    from edp_det.deploy.export import onnx_opset_range
    from edp_det.runtime.errors import ConfigError

    if args.format != "onnx" and _given(args, "opset", "static", "dynamic"):
        raise ConfigError(f"{', '.join(_given(args, 'opset', 'static', 'dynamic'))}: ONNX options, not used with "
                          f"--format {args.format}")
    if args.static and args.dynamic:
        raise ConfigError("--static and --dynamic exclude each other")
    if args.opset is not None:
        lo, hi, note = onnx_opset_range()
        if args.opset < lo:
            raise ConfigError(f"--opset {args.opset}: must be >= {lo} for detection models")
        if hi is not None and args.opset > hi:
            raise ConfigError(f"--opset {args.opset}: the installed torch exports opsets {lo} to {hi}"
                              f"{f' ({note})' if note else ''}")
    if not args.verify and _given(args, "verify_images", "data_root", "split", "verify_count"):
        raise ConfigError(f"{', '.join(_given(args, 'verify_images', 'data_root', 'split', 'verify_count'))}: "
                          "only used with --verify")
    if args.verify_images and args.data_root:
        raise ConfigError("--verify-images and --data-root exclude each other: give images or a VOC folder")
    if args.data_root is None and _given(args, "split", "verify_count"):
        raise ConfigError(f"{', '.join(_given(args, 'split', 'verify_count'))}: only used with --data-root")
    if args.verify_count is not None and args.verify_count < 1:
        raise ConfigError(f"--verify-count: must be >= 1, got {args.verify_count}")


def _verify_images(args) -> list | None:
    """The images --verify compares on ([C, H, W] tensors in [0, 1]); None: a random image."""
    from torchvision.transforms.functional import to_tensor

    from edp_det.data.voc import VOCDataset, load_image

    if args.verify_images:
        return [to_tensor(load_image(p)) for p in args.verify_images]
    if args.data_root:
        ds = VOCDataset(args.data_root, args.split or "test", check_images=False, evaluation=True)
        return [ds[i][0] for i in range(min(args.verify_count or 4, len(ds)))]
    return None


def _verify(res, model, images) -> None:
    """Print the verification of the exported file; SystemExit(1) when it fails or checks nothing."""
    from edp_det.deploy.export import verify_detections, verify_onnx, verify_torchscript

    if res.part == "detector" and images is None:
        from edp_det.deploy.export import example_inputs

        images = [example_inputs(model, res.input_size, "detector")]
        print("  verify: no --verify-images / --data-root given: using one random image")
    if res.part != "detector":
        check = verify_onnx(res, model) if res.format == "onnx" else verify_torchscript(res, model)
        status = "OK" if check["ok"] else f"MISMATCH ({check['reason']})"
        diff = "-" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.3g}"
        print(f"  verify: {status}; max |exported - pytorch| = {diff} over {check['num_outputs']} outputs")
        if not check["ok"]:
            raise SystemExit(1)
        return
    check = verify_detections(res, model, images)
    if check["resized"]:
        print(f"  verify: {check['resized']} image(s) resized to the static export size "
              f"{'x'.join(map(str, res.input_size[1:]))} (the file rejects other sizes)")
    if check["void"]:
        print(f"  verify: VOID: {check['reason']}; pass --verify-images or --data-root with images the model "
              "detects objects in")
        raise SystemExit(1)
    status = "OK" if check["ok"] else f"MISMATCH ({check['reason']})"
    print(f"  verify: {status} on {check['images']} image(s) with {sum(check['detections'])} detections; "
          f"max |box diff| = {check['max_box_diff']:.3g} px, max |score diff| = {check['max_score_diff']:.3g}, "
          f"labels {'identical' if check['labels_equal'] else 'DIFFERENT'}")
    if not check["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cli_main(main, get_args_parser().parse_args(), "export", interrupted=INTERRUPTED_ATOMIC)
