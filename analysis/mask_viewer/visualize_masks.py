"""Show the masks that the pre-training data set draws (``ibot.data.ImageFolderMask`` with the
``ibot.augment.DataAugmentationiBOT`` crops), to check block vs random masking and the ratio.

    python analysis/mask_viewer/visualize_masks.py --data_path data/fmnist/train --patch_size 16 \
        --pred_shape block --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 --batch_size 8 --output_file masks.png

One batch of ``--batch_size`` images (the first ones, or a seeded random choice with ``--shuffle``)
goes through the pre-training data set exactly as ``main_ibot.py`` builds it (masks for the global
crops only, ``mask_crops = --global_crops_number``). The PNG is a grid with one row per image and one
column per masked crop: the de-normalised crop, its masked patches tinted orange and the patch grid
drawn. The masked share of the batch (mean of all mask entries) is printed, with the share per crop.
"""
import argparse

import numpy as np
import torch

from ibot.data.augment import DataAugmentationiBOT
from ibot.data.folders import ImageFolderMask
from ibot.viz.drawing import denormalize, image_grid, overlay_patch_mask, save_image, to_uint8

__all__ = ["get_args_parser", "draw_batch", "main"]


def get_args_parser():
    """Masking and crop flags of ``main_ibot.py`` (same names and defaults) plus viewer options."""
    p = argparse.ArgumentParser("Visualise the iBOT masks of a batch")
    p.add_argument("--data_path", required=True, type=str)
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--patch_size", default=16, type=int, help="mask cell in pixels (8 * patch for Swin)")
    p.add_argument("--pred_ratio", default=[0.3], type=float, nargs="+")
    p.add_argument("--pred_ratio_var", default=[0.0], type=float, nargs="+")
    p.add_argument("--pred_shape", default="block", choices=["block", "rand"])
    p.add_argument("--pred_aspect_ratio", default=[0.3, 1 / 0.3], type=float, nargs=2)
    p.add_argument("--global_crops_number", default=2, type=int)
    p.add_argument("--local_crops_number", default=0, type=int)
    p.add_argument("--global_crops_scale", default=[0.14, 1.0], type=float, nargs=2)
    p.add_argument("--local_crops_scale", default=[0.05, 0.4], type=float, nargs=2)
    p.add_argument("--global_crops_size", default=224, type=int)
    p.add_argument("--local_crops_size", default=96, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--epoch", default=0, type=int, help="epoch whose masks are drawn (enters the seed)")
    p.add_argument("--shuffle", action="store_true", help="pick a seeded random batch instead of the first images")
    p.add_argument("--output_file", default="masks.png", type=str)
    return p


def draw_batch(crops, masks, patch_size, pad=2):
    """Grid image of masked crops.

    Args:
        crops: list over images of lists of (3, H, W) normalised crops (only the first
            ``len(masks[i])`` are drawn); masks: list over images of lists of (h, w) bool arrays.
    Returns:
        uint8 array (n_images * H + pad * (n_images - 1), n_crops * W + pad * (n_crops - 1), 3).
    """
    cells = []
    ncol = len(masks[0])
    for img_crops, img_masks in zip(crops, masks):
        for crop, mask in zip(img_crops, img_masks):
            cells.append(overlay_patch_mask(to_uint8(denormalize(crop)), np.asarray(mask), patch_size))
    return image_grid(cells, ncol, pad=pad, pad_value=255)


def main(argv=None):
    """Run the viewer. Returns ``{'file', 'masked_share', 'per_crop_share' (list), 'masks' (bool array
    (n_images, n_crops, h, w))}``."""
    args = get_args_parser().parse_args(argv)
    transform = DataAugmentationiBOT(args.global_crops_scale, args.local_crops_scale, args.global_crops_number,
                                     args.local_crops_number, args.global_crops_size, args.local_crops_size)
    ds = ImageFolderMask(args.data_path, transform=transform, patch_size=args.patch_size,
                         pred_ratio=args.pred_ratio, pred_ratio_var=args.pred_ratio_var,
                         pred_aspect_ratio=tuple(args.pred_aspect_ratio), pred_shape=args.pred_shape,
                         mask_crops=args.global_crops_number, seed=args.seed)
    ds.set_epoch(args.epoch)
    n = min(args.batch_size, len(ds))
    if args.shuffle:
        indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    else:
        indices = list(range(n))
    crops, masks = [], []
    for i in indices:
        c, _, m = ds[i]
        crops.append(c)
        masks.append(m)
    arr = np.stack([np.stack(m) for m in masks]).astype(bool)             # (n, crops, h, w)
    share = float(arr.mean())
    per_crop = arr.reshape(arr.shape[0], arr.shape[1], -1).mean(-1)
    path = save_image(draw_batch(crops, masks, args.patch_size), args.output_file)
    print(f"{args.pred_shape} masking, pred_ratio {args.pred_ratio} (var {args.pred_ratio_var}): masked share "
          f"{share:.4f} over {arr.shape[0]} images x {arr.shape[1]} crops of {arr.shape[2]}x{arr.shape[3]} patches")
    print("per-crop shares: " + " ".join(f"{v:.3f}" for v in per_crop.flatten()))
    print(f"Mask grid written to {path}")
    return {"file": path, "masked_share": share, "per_crop_share": per_crop.flatten().tolist(), "masks": arr}


if __name__ == "__main__":
    main()
