#!/usr/bin/env python
"""Mask-generation throughput of one process (= one DataLoader worker).

Prints masks/s for the README recipe (224 px global crops, patch 16 -> 14x14 grid; 96 px local
crops -> 6x6; ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``, block) and for patch 4 on 32 px / 16 px
crops (8x8 / 4x4 grids), plus a few other shapes, and — for scale — the time of the multi-crop
augmentation of one image. Usage: ``python benchmarks/masks.py [--n 20000] [--no-aug]``.
"""

import argparse
import random
import sys
import time

from ibot.data.masking import MaskGenerator

SETTINGS = [
    # name, grid, pred_ratio, pred_ratio_var, shape
    ("README ViT/16 global 224px", (14, 14), [0.0, 0.3], [0.0, 0.2], "block"),
    ("README ViT/16 local 96px", (6, 6), [0.0, 0.3], [0.0, 0.2], "block"),
    ("patch 4 global 32px", (8, 8), [0.0, 0.3], [0.0, 0.2], "block"),
    ("patch 4 local 16px", (4, 4), [0.0, 0.3], [0.0, 0.2], "block"),
    ("ViT/16 224px ratio 0.3 (always masked)", (14, 14), 0.3, 0.0, "block"),
    ("ViT/8 224px README ratios", (28, 28), [0.0, 0.3], [0.0, 0.2], "block"),
    ("ViT/16 224px rand 0.65|0.75", (14, 14), [0.65, 0.75], [0.0, 0.0], "rand"),
]


def bench(grid, ratio, var, shape, n):
    """Return masks per second for ``n`` masks on ``grid`` (best of 3 runs)."""
    gen = MaskGenerator(grid, ratio, var, pred_shape=shape)
    rng = random.Random(0)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            gen(rng)
        best = min(best, time.perf_counter() - t)
    return n / best


def bench_aug(global_size, local_size, nl, n):
    """Seconds per image of DataAugmentationiBOT (2 global + nl local crops) on a 256 px / 32 px image."""
    import numpy as np
    from PIL import Image

    from ibot.data.augment import DataAugmentationiBOT
    aug = DataAugmentationiBOT((0.25, 1.0), (0.05, 0.25), 2, nl, global_size, local_size)
    side = 256 if global_size > 64 else global_size
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    t = time.perf_counter()
    for _ in range(n):
        aug(img)
    return (time.perf_counter() - t) / n


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20000, help="masks per setting and run")
    p.add_argument("--no-aug", action="store_true", help="skip the augmentation timing")
    args = p.parse_args()
    print(f"mask generation, one process (python {sys.version.split()[0]})")
    rates = {}
    for name, grid, ratio, var, shape in SETTINGS:
        r = bench(grid, ratio, var, shape, args.n)
        rates[name] = r
        print(f"  {name:42s} grid {grid[0]:2d}x{grid[1]:<2d} {shape:5s}: {r:10,.0f} masks/s "
              f"({1e6 / r:6.1f} us/mask)")
    per_img_readme = 2 / rates[SETTINGS[0][0]] + 10 / rates[SETTINGS[1][0]]
    per_img_small = 2 / rates[SETTINGS[2][0]] + 6 / rates[SETTINGS[3][0]]
    print(f"  per image, README (2x14x14 + 10x6x6 masks, official: every crop): "
          f"{per_img_readme * 1e3:.3f} ms; with mask_crops=2: {2e3 / rates[SETTINGS[0][0]]:.3f} ms")
    print(f"  per image, patch 4 (2x8x8 + 6x4x4 masks): {per_img_small * 1e3:.3f} ms")
    if not args.no_aug:
        import torch
        torch.set_num_threads(1)
        a = bench_aug(224, 96, 10, 20)
        b = bench_aug(32, 16, 6, 200)
        print("augmentation for comparison, one process:")
        print(f"  README 2x224 + 10x96 crops from a 256 px image: {a * 1e3:.1f} ms/image "
              f"(masks = {100 * per_img_readme / a:.1f} % of it)")
        print(f"  2x32 + 6x16 crops from a 32 px image:           {b * 1e3:.2f} ms/image "
              f"(masks = {100 * per_img_small / b:.1f} % of it)")


if __name__ == "__main__":
    main()
