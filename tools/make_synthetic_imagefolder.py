"""Write a synthetic shapes classification dataset in the ImageNet folder layout (train/<class>/ and
val/<class>/), ready for tools/train_cls.py.

examples:
  python tools/make_synthetic_imagefolder.py --out data/synthetic_cls --num-train 200 --num-val 50
  python tools/make_synthetic_imagefolder.py --out data/cls5 --num-train 20 --num-val 5 --image-size 32 \\
      --classes circle square triangle star cross

The same seed writes the same images.
"""

from __future__ import annotations

import argparse

from edp_det.harness.cli import INTERRUPTED_DATASET, cli_main, tool_parser


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--out", required=True, help="output folder (gets train/<class>/ and val/<class>/)")
    p.add_argument("--num-train", type=int, required=True, help="train images per class")
    p.add_argument("--num-val", type=int, required=True, help="val images per class")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--classes", nargs="+", default=["circle", "square", "triangle"],
                   help="shape classes (circle square triangle diamond cross star hexagon)")
    return p


def main(args: argparse.Namespace) -> dict:
    from edp_det.data.imagefolder import make_synthetic_imagefolder

    s = make_synthetic_imagefolder(args.out, args.num_train, args.num_val, image_size=args.image_size,
                                   seed=args.seed, classes=args.classes)
    print(f"wrote {args.num_train} train + {args.num_val} val images per class for {len(s['classes'])} classes "
          f"({','.join(s['classes'])}; {s['image_size']}px, seed {s['seed']}) to {s['root']}")
    return s


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "make_synthetic_imagefolder", interrupted=INTERRUPTED_DATASET)
