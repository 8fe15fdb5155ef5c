"""Write a synthetic shapes classification dataset in the ImageNet folder layout.

    python tools/make_synthetic_imagefolder.py --out data/synthetic_cls --num-train 200 --num-val 50
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
    p.add_argument("--out", required=True, help="output folder (gets train/<class>/ and val/<class>/)")
    p.add_argument("--num-train", type=int, required=True, help="train images per class")
    p.add_argument("--num-val", type=int, required=True, help="val images per class")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", nargs="+", default=["circle", "square", "triangle"],
                   help="shape classes (circle square triangle diamond cross star hexagon)")
    return p


def main(args: argparse.Namespace) -> dict:
    from edp_det.data.imagefolder import make_synthetic_imagefolder

    try:
        s = make_synthetic_imagefolder(args.out, args.num_train, args.num_val, image_size=args.image_size,
                                       seed=args.seed, classes=args.classes)
    except (EDPError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.num_train} train + {args.num_val} val images per class for {len(s['classes'])} classes "
          f"({','.join(s['classes'])}; {s['image_size']}px, seed {s['seed']}) to {s['root']}")
    return s


if __name__ == "__main__":
    main(get_args_parser().parse_args())
