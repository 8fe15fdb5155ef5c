"""Write a synthetic shapes dataset in the VOC layout.

    python tools/make_synthetic_voc.py --out data/synthetic_voc --num-train 300 --num-test 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import edp_det  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edp_det.runtime.errors import EDPError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (gets Annotations/, JPEGImages/, ImageSets/Main/)")
    p.add_argument("--num-train", type=int, required=True, help="images in trainval (= train)")
    p.add_argument("--num-test", type=int, required=True, help="images in test")
    p.add_argument("--image-size", type=int, default=256, help="square image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", nargs="+", default=["circle", "square", "triangle"],
                   help="shape classes (circle square triangle diamond cross star hexagon)")
    return p


def main(args: argparse.Namespace) -> dict:
    from edp_det.data.synthetic import make_synthetic_voc

    try:
        s = make_synthetic_voc(args.out, args.num_train, args.num_test, image_size=args.image_size,
                               seed=args.seed, classes=args.classes)
    except (EDPError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {s['num_train']} trainval + {s['num_test']} test images ({s['num_objects']} objects, "
          f"{s['num_difficult']} difficult, {s['num_truncated']} truncated; classes {','.join(s['classes'])}; "
          f"{s['image_size']}px, seed {s['seed']}) to {s['root']}")
    return s


if __name__ == "__main__":
    main(get_args_parser().parse_args())
