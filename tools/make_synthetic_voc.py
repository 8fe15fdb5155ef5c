"""Write a synthetic shapes detection dataset (circles, squares, triangles, ... on textured backgrounds) in the
VOC layout, ready for tools/train_det.py and tools/eval_det.py.

examples:
  python tools/make_synthetic_voc.py --out data/synthetic_voc --num-train 300 --num-test 100
  python tools/make_synthetic_voc.py --out data/shapes5 --num-train 50 --num-test 20 --image-size 128 \\
      --classes circle square triangle star cross

The folder gets Annotations/, JPEGImages/ and ImageSets/Main/{trainval,train,test}.txt. The same seed writes the
same images.
"""

from __future__ import annotations

import argparse

from edp_det.harness.cli import INTERRUPTED_DATASET, cli_main, tool_parser


def get_args_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__)
    p.add_argument("--out", required=True, help="output folder (gets Annotations/, JPEGImages/, ImageSets/Main/)")
    p.add_argument("--num-train", type=int, required=True, help="images in trainval (= train)")
    p.add_argument("--num-test", type=int, required=True, help="images in test")
    p.add_argument("--image-size", type=int, default=256, help="square image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--classes", nargs="+", default=["circle", "square", "triangle"],
                   help="shape classes (circle square triangle diamond cross star hexagon)")
    return p


def main(args: argparse.Namespace) -> dict:
    from edp_det.data.synthetic import make_synthetic_voc

    s = make_synthetic_voc(args.out, args.num_train, args.num_test, image_size=args.image_size, seed=args.seed,
                           classes=args.classes)
    print(f"wrote {s['num_train']} trainval + {s['num_test']} test images ({s['num_objects']} objects, "
          f"{s['num_difficult']} difficult, {s['num_truncated']} truncated; classes {','.join(s['classes'])}; "
          f"{s['image_size']}px, seed {s['seed']}) to {s['root']}")
    return s


if __name__ == "__main__":
    cli_main(main, get_args_parser().parse_args(), "make_synthetic_voc", interrupted=INTERRUPTED_DATASET)
