"""[CLS] self-attention maps of the last ViT block (official ``analysis/attention_map/visualize_attention.py``,
evaluation.md §3.1).

    python analysis/attention_map/visualize_attention.py --arch vit_small --patch_size 16 \
        --pretrained_weights ckpt.pth --checkpoint_key teacher --data_path data/imagenet/val \
        --output_dir attn --show_pics 100 --threshold 0.6
    python analysis/attention_map/visualize_attention.py ... --image_path img.jpg

For every image: resize to exactly ``--image_size`` (aspect not kept), normalise, crop to a
multiple of the patch size; take the last block's attention from [CLS] to every patch for every
head; per head, keep the smallest set of patches holding ``--threshold`` of the attention mass
(:func:`ibot.visualize.mass_threshold_mask`); upsample x patch size (nearest).

Outputs in ``--output_dir``: ``idx<dataset index>_attn.png`` (``attn.png`` with ``--image_path``):
three panels side by side — the input, the colour composite of the thresholded heads
(``--composite_heads``, default the first 6) and a strip of the raw per-head maps (viridis, each
min-max normalised) — plus the official scratch files ``img.png``, ``attn-head<j>.png`` and
``attn_color.png`` (overwritten for every image).

Differences from the official script: weights are never downloaded (an empty
``--pretrained_weights`` keeps the random initialisation with a warning; a missing file is an
error); the figure is composed with NumPy/Pillow (no display, deterministic sizes); one of
``--image_path``/``--data_path`` is required (the official code downloaded a sample image).
"""
import argparse
import os

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from ibot.eval.features import image_folder
from ibot.eval.flags import backbone_parser, data_parser, device_parser
from ibot.utils.misc import fix_random_seeds
from ibot.viz.loading import build_vit, load_rgb, pick_device
from ibot.viz.drawing import (IMAGENET_MEAN, IMAGENET_STD, attention_composite, cls_attention, colorize,
                            crop_to_patch_multiple, denormalize, hstack, mass_threshold_mask, save_image,
                            to_uint8, upsample_nearest)

__all__ = ["get_args_parser", "attention_maps", "render_attention", "main"]


def get_args_parser():
    """Official flags (+ ``--composite_heads``, ``--device``, ``--num_workers``)."""
    p = argparse.ArgumentParser("Visualize Self-Attention maps", parents=[
        backbone_parser(patch_size=8, window_size=None, family="vit"),
        data_parser(data_path=None, batch_size=32, batch_flag="--batch_size", num_workers=0), device_parser()])
    p.add_argument("--image_path", default=None, type=str, help="a single image (else --data_path)")
    p.add_argument("--image_size", default=(480, 480), type=int, nargs="+", help="resize (H W), aspect not kept")
    p.add_argument("--output_dir", default=".", type=str)
    p.add_argument("--show_pics", default=100, type=int, help="stop after this many images")
    p.add_argument("--threshold", type=float, default=0.6, help="share of attention mass kept per head")
    p.add_argument("--composite_heads", default=None, type=int, nargs="+",
                   help="heads of the colour composite (default: the first 6)")
    return p


@torch.no_grad()
def attention_maps(model, images, threshold):
    """Per-head [CLS] attention maps and their mass-threshold masks at pixel resolution.

    Args:
        model: ViT (``patch_size`` attribute); images: (B, 3, H, W) normalised, any size (cropped to
            a multiple of the patch size).
        threshold: share of the attention mass kept per head (None: no mask).
    Returns:
        dict with ``images`` (B, 3, H', W') cropped input, ``grid`` (B, nh, h, w) attention,
        ``maps`` (B, nh, H', W') nearest-upsampled attention, ``grid_masks`` (B, nh, h, w) bool and
        ``masks`` (B, nh, H', W') bool (both None without threshold).
    """
    p = model.patch_size
    images = crop_to_patch_multiple(images, p)
    grid = cls_attention(model, images)                                  # (B, nh, h, w)
    B, nh, h, w = grid.shape
    out = {"images": images, "grid": grid, "maps": upsample_nearest(grid, p), "grid_masks": None, "masks": None}
    if threshold is not None:
        gm = mass_threshold_mask(grid.reshape(B, nh, h * w), threshold).reshape(B, nh, h, w)
        out["grid_masks"] = gm
        out["masks"] = upsample_nearest(gm, p)
    return out


def render_attention(image, maps, masks, composite_heads=None):
    """Three-panel figure of one image.

    Args:
        image: (3, H, W) normalised input; maps: (nh, H, W) attention; masks: (nh, H, W) bool.
    Returns:
        (figure, panels): uint8 array (H, W * (2 + nh) + 2 * (nh + 1), 3) and the dict of the
        individual uint8 panels ``img`` (H, W, 3), ``color`` (H, W, 3), ``heads`` (list of nh
        (H, W, 3) colour-mapped head maps).
    """
    rgb = denormalize(image.cpu().float())
    img = to_uint8(rgb)
    color = attention_composite(rgb, maps, masks, heads=composite_heads)
    heads = [colorize(maps[j]) for j in range(maps.shape[0])]
    strip = hstack(heads, pad=2)
    return hstack([img, color, strip], pad=2), {"img": img, "color": color, "heads": heads}


def _write(out_dir, name, image, maps, masks, composite_heads):
    figure, panels = render_attention(image, maps, masks, composite_heads)
    save_image(panels["img"], os.path.join(out_dir, "img.png"))
    for j, hm in enumerate(panels["heads"]):
        save_image(hm, os.path.join(out_dir, f"attn-head{j}.png"))
    save_image(panels["color"], os.path.join(out_dir, "attn_color.png"))
    return save_image(figure, os.path.join(out_dir, name))


def main(argv=None):
    """Run the tool. Returns ``{'files': [figure paths], 'attention': [(nh, h, w) grids], 'masks': [...],
    'indices': [dataset indices]}`` (lists in processing order)."""
    args = get_args_parser().parse_args(argv)
    if not args.image_path and not args.data_path:
        raise SystemExit("give --image_path (one image) or --data_path (an ImageFolder root)")
    size = tuple(args.image_size) if len(args.image_size) == 2 else (args.image_size[0],) * 2
    fix_random_seeds(0)
    device = pick_device(args.device)
    model = build_vit(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key, device)
    os.makedirs(args.output_dir, exist_ok=True)
    transform = transforms.Compose([transforms.Resize(size), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    result = {"files": [], "attention": [], "masks": [], "indices": []}

    def handle(batch, names, indices):
        out = attention_maps(model, batch.to(device), args.threshold)
        for k in range(batch.shape[0]):
            path = _write(args.output_dir, names[k], out["images"][k], out["maps"][k].cpu(),
                          out["masks"][k].cpu(), args.composite_heads)
            result["files"].append(path)
            result["attention"].append(out["grid"][k].cpu())
            result["masks"].append(out["grid_masks"][k].cpu())
            result["indices"].append(indices[k])
            print(f"{path} saved.")

    if args.image_path:
        handle(transform(load_rgb(args.image_path)).unsqueeze(0), ["attn.png"], [None])
        return result
    dataset = image_folder(args.data_path, transform, with_index=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(0))
    for images, _, index in loader:
        left = args.show_pics - len(result["files"])
        if left <= 0:
            break
        images, index = images[:left], index[:left].tolist()
        handle(images, [f"idx{i}_attn.png" for i in index], index)
    return result


if __name__ == "__main__":
    main()
