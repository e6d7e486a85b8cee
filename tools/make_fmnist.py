#!/usr/bin/env python
"""Build a Fashion-MNIST ImageFolder tree: ``python tools/make_fmnist.py --out data/fmnist``."""

import argparse
import sys

from ibot.data.fmnist import DEFAULT_SRC, build_fmnist_folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (bicubic from 28)")
    p.add_argument("--per_class_train", type=int, default=None,
                   help="first N training images of every class (default: all 6000)")
    p.add_argument("--per_class_val", type=int, default=None,
                   help="first N test images of every class (default: all 1000)")
    p.add_argument("--src", default=DEFAULT_SRC, help="folder with the IDX .gz files")
    args = p.parse_args(argv)
    try:
        res = build_fmnist_folder(args.out, size=args.size, per_class_train=args.per_class_train,
                                  per_class_val=args.per_class_val, src=args.src, verbose=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "built" if res["built"] else "already complete, nothing written"
    print(f"{res['out_dir']}: train {res['train']} / val {res['val']} images, "
          f"{res['classes']} classes, {res['size']} px ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
