"""Robustness to occlusion and patch shuffling (official ``analysis/occlusion/eval.py``, evaluation.md §3.7).

    python analysis/occlusion/eval.py --model_name vit_small --pretrained_weights classifier.pth \
        --test_data data/imagenet/val --random_drop
    python analysis/occlusion/eval.py ... --shuffle --shuffle_h 2 2 4 4 8 14 16 --shuffle_w 2 4 4 8 8 14 16
    python analysis/occlusion/eval.py ... --dino [--dino_weights dino_vits16.pth]

Classifier: :func:`ibot.eval.classifiers.build_classifier` (the official ``analysis/imagenet_models``;
``--linear_eval true``: backbone + ``linear`` from an ``analysis/combine_ckpt.py`` file; false: a
fine-tuned ViT and its ``head``). Prediction = argmax of
the logits. Data: resize ``--scale_size`` (bilinear, bicubic with ``--bicubic_resize``), centre crop
``--img_size``, normalise (ImageNet mean/std, or 0.5 with ``--imagenet_default_color false``); the
loader is shuffled; seeds are 1.

* ``--random_drop``: a (img_size / patch_size)^2 grid of patch_size-px cells; for j = 0..9 the
  pixels of floor(j · G / 10) random cells are set to 0 after normalisation (the same cells for a
  whole batch, new cells for each batch). ``--random_offset_drop`` shifts the cell grid by half a
  cell. Result ``{"random_drop": {run: {j: top-1 fraction}}}``.
* ``--shuffle``: for every (h, w) of ``--shuffle_h``/``--shuffle_w`` (or square grids from
  ``--shuffle_size``) the image is cut into h x w tiles and the tiles are permuted (one permutation
  per batch). Result keyed by h·w.
* ``--dino``: saliency from the last-layer [CLS] attention of head ``--dino_head`` (1) of an
  "attentioner"; for λ = 0.1..1.0 the mass-threshold mask (§3.1) keeps λ of the attention mass;
  the foreground (mask) is removed (``drop_foreground``) or kept alone (``keep_foreground``); both
  settings are reported with the information loss ratio (mean share of patches removed).
  **Deviation (offline):** the official script downloads DINO ViT-S/16 as the attentioner; here
  ``--dino_weights`` takes a local file (``--dino_arch``/``--dino_patch_size``), and without it the
  evaluated classifier's own backbone is used.

Other fixes: the accumulator that crashed random-drop/shuffle runs with a NameError is initialised;
``--num_classes`` defaults to the checkpoint's; runs on CPU as well as GPU. Parsed for compatibility
but unused (as officially): ``--drop_count``, ``--drop_lambda``, ``--drop_best`` (both settings are
always reported), ``--lesion``/``--block_index`` (not implemented). ``--test_image`` saves example
grids of the perturbed first batch under ``<output_dir>/report/`` and returns.
Results are printed and written to ``<output_dir>/occlusion_results.json``.
"""
import argparse
import json
import os

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ibot.eval.classifiers import build_classifier, predict as classifier_predict
from ibot.eval.features import image_folder
from ibot.eval.flags import backbone_parser, data_parser, device_parser
from ibot.utils.misc import bool_flag, fix_random_seeds
from ibot.viz.drawing import (IMAGENET_MEAN, IMAGENET_STD, cls_attention, denormalize, image_grid,
                            mass_threshold_mask, save_image, to_uint8, upsample_nearest)
from ibot.viz.loading import build_vit, pick_device, vit_arch_choices

__all__ = ["get_args_parser", "random_cell_mask", "apply_pixel_mask", "shuffle_patches", "saliency_masks", "main"]


def get_args_parser():
    """Official flags (the used ones and those parsed for compatibility) plus ``--dino_weights``,
    ``--dino_arch``, ``--dino_patch_size``, ``--dino_head``, ``--num_classes``, ``--output_dir``, ``--device``."""
    p = argparse.ArgumentParser("Occlusion / shuffle robustness", parents=[
        backbone_parser(patch_size=16, window_size=None, family="vit", checkpoint_key=None, arch_flag="--model_name"),
        data_parser(batch_size=1024, batch_flag="--batch_size", num_workers=0, with_data_path=False), device_parser()])
    p.add_argument("--test_data", default="/path/to/imagenet/val", type=str)
    p.add_argument("--linear_eval", default=True, type=bool_flag)
    p.add_argument("--scale_size", default=256, type=int)
    p.add_argument("--img_size", default=224, type=int)
    p.add_argument("--imagenet_default_color", default=True, type=bool_flag)
    p.add_argument("--bicubic_resize", default=False, type=bool_flag)
    p.add_argument("--random_drop", action="store_true")
    p.add_argument("--random_offset_drop", action="store_true")
    p.add_argument("--drop_count", default=180, type=int, help="parsed, unused (official)")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--shuffle_size", default=[14], type=int, nargs="+")
    p.add_argument("--shuffle_h", default=None, type=int, nargs="+")
    p.add_argument("--shuffle_w", default=None, type=int, nargs="+")
    p.add_argument("--dino", action="store_true")
    p.add_argument("--drop_best", action="store_true", help="parsed; both settings are always reported")
    p.add_argument("--drop_lambda", default=0.2, type=float, help="parsed, unused (official)")
    p.add_argument("--lesion", action="store_true", help="not implemented")
    p.add_argument("--block_index", default=0, type=int)
    p.add_argument("--exp_count", default=1, type=int)
    p.add_argument("--test_image", action="store_true")
    p.add_argument("--dino_weights", default="", type=str,
                   help="local attentioner weights (official: DINO ViT-S/16, downloaded); default: own backbone")
    p.add_argument("--dino_arch", default="vit_small", type=str, choices=vit_arch_choices())
    p.add_argument("--dino_patch_size", default=16, type=int)
    p.add_argument("--dino_head", default=1, type=int)
    p.add_argument("--num_classes", default=None, type=int, help="default: from the checkpoint (else 1000)")
    p.add_argument("--output_dir", default=".", type=str)
    return p


def random_cell_mask(img_size, cell, n_drop, offset=0, generator=None):
    """Pixel mask of ``n_drop`` random cells of a (img_size // cell)^2 grid.

    Args:
        offset: shift of the grid in pixels (down and right; cells pushed past the border are cut).
    Returns:
        (img_size, img_size) bool tensor, True = dropped.
    """
    g = img_size // cell
    cells = torch.zeros(g * g, dtype=torch.bool)
    cells[torch.randperm(g * g, generator=generator)[:n_drop]] = True
    pix = upsample_nearest(cells.reshape(g, g), cell)
    full = torch.zeros(img_size, img_size, dtype=torch.bool)
    full[:pix.shape[0], :pix.shape[1]] = pix
    if offset:
        shifted = torch.zeros_like(full)
        shifted[offset:, offset:] = full[:-offset, :-offset]
        full = shifted
    return full


def apply_pixel_mask(images, mask, value=0.0):
    """Set ``images (B, 3, H, W)`` to ``value`` where ``mask`` ((H, W) or (B, H, W) bool) is True."""
    m = mask if mask.dim() == 3 else mask.unsqueeze(0)
    return images.masked_fill(m.unsqueeze(1).to(images.device), value)


def shuffle_patches(images, h, w, perm):
    """Cut ``images (B, C, H, W)`` into h x w tiles and reorder them: tile k of the output is tile
    ``perm[k]`` of the input (row-major). H, W must be multiples of h, w. Returns (B, C, H, W)."""
    B, C, H, W = images.shape
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} image cannot be cut into {h}x{w} equal tiles")
    th, tw = H // h, W // w
    tiles = images.reshape(B, C, h, th, w, tw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C, th, tw)
    tiles = tiles[:, perm]
    return tiles.reshape(B, h, w, C, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


@torch.no_grad()
def saliency_masks(attentioner, images, head, lam):
    """Mass-threshold foreground of one attention head at pixel resolution.

    Returns ``(pixel mask (B, H, W) bool, patch share in the mask (B,) float)``.
    """
    attn = cls_attention(attentioner, images)[:, head]                    # (B, h, w)
    B, h, w = attn.shape
    m = mass_threshold_mask(attn.reshape(B, -1), lam).reshape(B, h, w)
    pix = upsample_nearest(m, attentioner.patch_size)
    full = torch.zeros(B, images.shape[-2], images.shape[-1], dtype=torch.bool, device=pix.device)
    full[:, :pix.shape[1], :pix.shape[2]] = pix
    return full, m.float().flatten(1).mean(1)


def _grids(args):
    if args.shuffle_h or args.shuffle_w:
        if not (args.shuffle_h and args.shuffle_w) or len(args.shuffle_h) != len(args.shuffle_w):
            raise SystemExit("--shuffle_h and --shuffle_w must be given together with the same length")
        return list(zip(args.shuffle_h, args.shuffle_w))
    return [(s, s) for s in args.shuffle_size]


def main(argv=None):
    """Run the selected modes. Returns the results dict (see the module docstring)."""
    args = get_args_parser().parse_args(argv)
    if not (args.random_drop or args.random_offset_drop or args.shuffle or args.dino):
        raise SystemExit("choose at least one of --random_drop, --random_offset_drop, --shuffle, --dino")
    if args.lesion:
        raise SystemExit("--lesion is not implemented")
    fix_random_seeds(1)
    device = pick_device(args.device)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet_default_color else ((0.5,) * 3, (0.5,) * 3)
    interp = InterpolationMode.BICUBIC if args.bicubic_resize else InterpolationMode.BILINEAR
    tf = transforms.Compose([transforms.Resize(args.scale_size, interpolation=interp),
                             transforms.CenterCrop(args.img_size), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    loader = DataLoader(image_folder(args.test_data, tf, with_index=False), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.num_workers, generator=torch.Generator().manual_seed(1))
    if not args.pretrained_weights:
        print("WARNING: no --pretrained_weights: evaluating a RANDOMLY initialised classifier")
    model = build_classifier(args.model_name, args.pretrained_weights or None, patch_size=args.patch_size,
                             linear_eval=args.linear_eval, num_classes=args.num_classes, img_size=args.img_size)
    model.to(device).eval()
    attentioner = None
    if args.dino:
        if args.dino_weights:
            attentioner = build_vit(args.dino_arch, args.dino_patch_size, args.dino_weights, "teacher", device)
        else:
            print("Saliency from the evaluated model's own last-layer attention (the official script downloads "
                  "DINO ViT-S/16; pass --dino_weights to use a local copy).")
            attentioner = model.backbone if args.linear_eval else model
        if not 0 <= args.dino_head < attentioner.blocks[-1].attn.num_heads:
            raise SystemExit(f"--dino_head {args.dino_head} out of range for {attentioner.blocks[-1].attn.num_heads} heads")
    gen = torch.Generator().manual_seed(1)
    cell = args.patch_size
    n_cells = (args.img_size // cell) ** 2
    lambdas = [round(0.1 * k, 1) for k in range(1, 11)]

    def predict(x):
        return classifier_predict(model, x, args.linear_eval)

    drop_modes = ([("random_drop", 0)] if args.random_drop else []) + \
                 ([("random_offset_drop", cell // 2)] if args.random_offset_drop else [])
    results = {}
    total = 0
    correct = {}          # key tuple -> count (the official accumulator, initialised)
    removed = {}          # dino: patch share removed
    for run in range(args.exp_count):
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            variants = []
            for mode, off in drop_modes:
                for j in range(10):
                    m = random_cell_mask(args.img_size, cell, (j * n_cells) // 10, off, gen)
                    variants.append(((mode, run, j), apply_pixel_mask(images, m), None))
            if args.shuffle:
                for h, w in _grids(args):
                    perm = torch.randperm(h * w, generator=gen).to(images.device)
                    variants.append((("shuffle", run, h * w), shuffle_patches(images, h, w, perm), None))
            if args.dino:
                for lam in lambdas:
                    fg, share = saliency_masks(attentioner, images, args.dino_head, lam)
                    variants.append((("drop_foreground", run, lam), apply_pixel_mask(images, fg), share))
                    variants.append((("keep_foreground", run, lam), apply_pixel_mask(images, ~fg), 1 - share))
            if args.test_image:
                for key, x, _ in variants:
                    grid = image_grid([to_uint8(denormalize(t.cpu(), mean, std)) for t in x[:16]], 4)
                    save_image(grid, os.path.join(args.output_dir, "report", f"{key[0]}_{key[2]}.png"))
                print(f"Example images written to {os.path.join(args.output_dir, 'report')}")
                return {"report": os.path.join(args.output_dir, "report")}
            for key, x, share in variants:
                correct[key] = correct.get(key, 0) + int((predict(x) == target).sum())
                if share is not None:
                    removed[key] = removed.get(key, 0.0) + float(share.sum())
            total += target.shape[0]
    if total == 0:
        raise RuntimeError(f"no image evaluated from {args.test_data}")
    per_run = total // args.exp_count
    for (mode, run, j), c in sorted(correct.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        acc = c / per_run
        if mode in ("drop_foreground", "keep_foreground"):
            results.setdefault("dino", {}).setdefault(mode, {}).setdefault(run, {})[j] = {
                "acc": acc, "info_loss_ratio": removed[(mode, run, j)] / per_run}
        else:
            results.setdefault(mode, {}).setdefault(run, {})[j] = acc
    print(json.dumps(results, indent=1))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "occlusion_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
