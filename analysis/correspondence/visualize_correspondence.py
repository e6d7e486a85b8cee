"""Patch correspondences between two images (official ``analysis/correspondence/visualize_correspondence.py``,
evaluation.md §3.3).

    python analysis/correspondence/visualize_correspondence.py --arch vit_small --patch_size 16 \
        --pretrained_weights backbone.pth --data_path data/imagenet/val --sample_type instance

Features: the evaluated network's last-layer normed patch tokens (B, T, D); the match of every patch
of image 1 is the argmax over the patches of image 2 of the raw dot product (no L2 normalisation).
Query points: the ``--topk`` patches of image 1 with the highest [CLS] attention, averaged over heads
and resized (nearest) to the evaluated model's patch grid.

* ``--sample_type class``: images resized to ``img_size`` x ``img_size``; batches of
  ``--batch_size`` images of one class (batches shuffled); image i is paired with image i+1 of its
  batch (cyclically).
* ``--sample_type instance``: two views of each image (RandomResizedCrop(img_size, scale 0.4-1,
  bicubic) + flip + colour jitter + greyscale); the crop boxes and flips are recorded and every patch
  centre is mapped back to the original image. The overlap mask holds the patches of view 1 whose
  centre lies inside view 2's extent (± half a patch); queries are restricted to it. **Accuracy** =
  share of overlapping patches whose predicted match lies within ``--eval_radius`` patches (row and
  column) of the geometrically nearest patch of view 2; the mean over batches is printed at the end.

Output: ``<output_path>/<sample_type>_corresp<cnt>_cls<label>_nh0.png``: the two images side by side
(preceded by the attention map with ``--show_with_attn true``) with red 1-px lines joining the query
centres to their matches; at most ``--show_nums`` figures.

**Deviation (offline):** the official script downloads the public DINO ViT-B/8 to choose the query
points. Nothing is downloaded here: by default the query attention comes from the evaluated model
itself; pass ``--attention_weights <file>`` (with ``--attention_arch vit_base --attention_patch_size
8``) to use a local copy of DINO ViT-B/8 (or any other ViT) as in the paper's figure.

Other fixes: the accuracy is always printed (the official script skipped it when ``--show_nums``
cut the loop short, which it always does with ``--show_pics true``); the overlap grid follows the
real patch grid (not a hard-coded 14 x 14); with ``--show_pics false`` the whole data set is
evaluated (``--max_pairs`` limits it). Weights are loaded with :func:`ibot.pretrained.load_pretrained_weights`
(flat, ``{'state_dict'}`` and full checkpoints).
"""
import argparse
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ibot.eval.features import image_folder
from ibot.eval.flags import backbone_parser, data_parser, device_parser
from ibot.utils.misc import bool_flag, fix_random_seeds
from ibot.viz.drawing import (IMAGENET_MEAN, IMAGENET_STD, cls_attention, colorize, denormalize,
                            draw_correspondences, hstack, save_image, to_uint8, upsample_nearest)
from ibot.viz.loading import build_vit, pick_device, vit_arch_choices

__all__ = ["get_args_parser", "SameClassBatchSampler", "TwoViewDataset", "patch_centres", "view_geometry",
           "query_attention", "match_patches", "instance_accuracy", "main"]


def get_args_parser():
    """Official flags plus the offline attention source (``--attention_*``), ``--checkpoint_key``,
    ``--max_pairs``, ``--device``, ``--num_workers``."""
    p = argparse.ArgumentParser("Visualize patch correspondences", parents=[
        backbone_parser(patch_size=16, window_size=None, family="vit"),
        data_parser(data_path="/path/to/imagenet/val", batch_size=2, batch_flag="--batch_size", num_workers=0),
        device_parser()])
    p.add_argument("--img_size", default=224, type=int)
    p.add_argument("--output_path", default="pics/", type=str)
    p.add_argument("--topk", default=12, type=int)
    p.add_argument("--show_pics", default=True, type=bool_flag)
    p.add_argument("--show_with_attn", default=False, type=bool_flag)
    p.add_argument("--show_nums", default=100, type=int)
    p.add_argument("--sample_type", default="class", choices=["class", "instance"])
    p.add_argument("--eval_radius", default=0, type=int)
    p.add_argument("--attention_weights", default="", type=str,
                   help="local weights of the query 'attentioner' (official: DINO ViT-B/8, downloaded); "
                        "default: the evaluated model's own attention")
    p.add_argument("--attention_arch", default="vit_base", type=str, choices=vit_arch_choices())
    p.add_argument("--attention_patch_size", default=8, type=int)
    p.add_argument("--attention_key", default="teacher", type=str)
    p.add_argument("--max_pairs", default=None, type=int, help="stop after this many image pairs")
    return p


class SameClassBatchSampler(Sampler):
    """Batches of ``batch_size`` indices of one class (shuffled within classes, batches shuffled).

    A class's last incomplete batch is kept when it has at least 2 images. ``targets``: list of
    labels (N,). Yields lists of indices.
    """

    def __init__(self, targets, batch_size, seed=1):
        rng = random.Random(seed)
        by_class = {}
        for i, t in enumerate(targets):
            by_class.setdefault(int(t), []).append(i)
        self.batches = []
        for c in sorted(by_class):
            idx = by_class[c]
            rng.shuffle(idx)
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                if len(chunk) >= 2:
                    self.batches.append(chunk)
        rng.shuffle(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class TwoViewDataset(Dataset):
    """Two random views of every image of an ImageFolder, with their geometry.

    ``__getitem__`` -> ``(view1 (3, S, S), view2 (3, S, S), geom1 (5,), geom2 (5,), label, index)``;
    ``geom = [top, left, height, width, flipped]`` of the crop box in original-image pixels.
    """

    def __init__(self, root, img_size, scale=(0.4, 1.0)):
        self.base = image_folder(root, transform=None, with_index=False)
        self.size, self.scale = img_size, scale
        self.color = transforms.Compose([
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.base)

    def _view(self, img):
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, list(self.scale), [3 / 4, 4 / 3])
        crop = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BICUBIC)
        flip = random.random() < 0.5
        if flip:
            crop = TF.hflip(crop)
        return self.color(crop), torch.tensor([top, left, h, w, float(flip)], dtype=torch.float64)

    def __getitem__(self, index):
        img, label = self.base[index]
        img = img.convert("RGB")
        v1, g1 = self._view(img)
        v2, g2 = self._view(img)
        return v1, v2, g1, g2, label, index

    @property
    def targets(self):
        return self.base.targets


def patch_centres(grid, patch_size):
    """Pixel centres (x, y) of the patches of an ``grid`` x ``grid`` view, row-major: (T, 2) float64."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([(c.flatten() + 0.5) * patch_size, (r.flatten() + 0.5) * patch_size], 1).double()


def view_geometry(geom1, geom2, img_size, patch_size):
    """Geometric correspondence of the patches of view 1 with view 2 of the same image.

    Args:
        geom1, geom2: (5,) ``[top, left, height, width, flipped]`` crop boxes (original pixels).
        img_size: view side S; patch_size: p (grid g = S // p).
    Returns:
        (overlap (T,) bool: patch centre of view 1 inside view 2's extent ± half a patch,
         nearest (T,) long: index of the patch of view 2 nearest to that centre, clamped to the grid).
    """
    g = img_size // patch_size
    pts = patch_centres(g, patch_size)                                    # view-1 pixels
    t1, l1, h1, w1, f1 = geom1.tolist()
    u = pts[:, 0].clone()
    if f1 > 0.5:
        u = img_size - u
    x = l1 + u * w1 / img_size                                            # original pixels
    y = t1 + pts[:, 1] * h1 / img_size
    t2, l2, h2, w2, f2 = geom2.tolist()
    half_x, half_y = 0.5 * patch_size * w2 / img_size, 0.5 * patch_size * h2 / img_size
    overlap = (x >= l2 - half_x) & (x <= l2 + w2 + half_x) & (y >= t2 - half_y) & (y <= t2 + h2 + half_y)
    u2 = (x - l2) * img_size / w2
    if f2 > 0.5:
        u2 = img_size - u2
    v2 = (y - t2) * img_size / h2
    col = torch.clamp(torch.floor(u2 / patch_size), 0, g - 1).long()
    row = torch.clamp(torch.floor(v2 / patch_size), 0, g - 1).long()
    return overlap, row * g + col


@torch.no_grad()
def query_attention(attentioner, images, grid_hw):
    """Head-averaged [CLS] attention of ``images (B, 3, H, W)`` resized (nearest) to ``grid_hw``: (B, h*w)."""
    attn = cls_attention(attentioner, images)                             # (B, nh, h', w')
    if tuple(attn.shape[-2:]) != tuple(grid_hw):
        attn = F.interpolate(attn, size=tuple(grid_hw), mode="nearest")
    return attn.mean(1).flatten(1)


@torch.no_grad()
def match_patches(model, images1, images2):
    """Best match in image 2 of every patch of image 1 (raw dot product of normed last-layer tokens).

    Args:
        images1, images2: (B, 3, H, W).
    Returns:
        (B, T) long tensor of patch indices of image 2.
    """
    f1 = model(images1, return_all_tokens=True)[:, 1:]
    f2 = model(images2, return_all_tokens=True)[:, 1:]
    return torch.bmm(f1, f2.transpose(1, 2)).argmax(-1)


def instance_accuracy(pred, nearest, overlap, grid, radius=0):
    """Correct / total over the overlapping patches of one pair.

    Args:
        pred, nearest: (T,) long patch indices in view 2; overlap: (T,) bool; grid: side g.
        radius: tolerance in patches (row and column).
    Returns:
        (correct, total) ints.
    """
    pr, pc = pred // grid, pred % grid
    nr, nc = nearest // grid, nearest % grid
    ok = ((pr - nr).abs() <= radius) & ((pc - nc).abs() <= radius) & overlap
    return int(ok.sum()), int(overlap.sum())


def _figure(img1, img2, queries, matches, grid, patch_size, attn=None):
    """uint8 figure: [attention map,] image 1, image 2 with lines joining query and match centres."""
    left = to_uint8(denormalize(img1.cpu()))
    right = to_uint8(denormalize(img2.cpu()))
    centres = patch_centres(grid, patch_size).numpy()
    p1 = centres[queries.cpu().numpy()]
    p2 = centres[matches.cpu().numpy()]
    if attn is not None:
        amap = colorize(upsample_nearest(attn.reshape(grid, grid).cpu(), patch_size).numpy())
        off = amap.shape[1]
        left = hstack([amap, left], pad=0)
        p1 = p1 + np.array([off, 0.0])
    return draw_correspondences(left, right, p1, p2, color=(255, 0, 0), width=1, gap=0)


def main(argv=None):
    """Run the tool. Returns ``{'files': [...], 'accuracy': mean over batches (instance) or None,
    'correct': int, 'total': int, 'pairs': int}``."""
    args = get_args_parser().parse_args(argv)
    fix_random_seeds(1)
    device = pick_device(args.device)
    model = build_vit(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key, device,
                      img_size=args.img_size)
    if args.attention_weights:
        attentioner = build_vit(args.attention_arch, args.attention_patch_size, args.attention_weights,
                                args.attention_key, device, img_size=args.img_size)
    else:
        print("Query points from the evaluated model's own attention (the official script downloads "
              "DINO ViT-B/8; pass --attention_weights to use a local copy).")
        attentioner = model
    os.makedirs(args.output_path, exist_ok=True)
    g = args.img_size // args.patch_size

    if args.sample_type == "class":
        tf = transforms.Compose([transforms.Resize((args.img_size, args.img_size)), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        ds = image_folder(args.data_path, tf, with_index=True)
        loader = DataLoader(ds, batch_sampler=SameClassBatchSampler(ds.targets, args.batch_size, seed=1),
                            num_workers=args.num_workers)
    else:
        ds = TwoViewDataset(args.data_path, args.img_size)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(1))

    files, batch_accs, correct, total, pairs = [], [], 0, 0, 0
    done = False
    for batch in loader:
        if args.sample_type == "class":
            images, labels = batch[0].to(device), batch[1]
            img1, img2 = images, torch.roll(images, shifts=-1, dims=0)
            overlap = torch.ones(images.shape[0], g * g, dtype=torch.bool)
        else:
            img1, img2, g1, g2, labels = batch[0].to(device), batch[1].to(device), batch[2], batch[3], batch[4]
            geo = [view_geometry(g1[i], g2[i], args.img_size, args.patch_size) for i in range(img1.shape[0])]
            overlap = torch.stack([o for o, _ in geo])
            nearest = torch.stack([n for _, n in geo])
        matches = match_patches(model, img1, img2).cpu()
        attn = query_attention(attentioner, img1, (g, g)).cpu()
        if args.sample_type == "instance":
            bc = bt = 0
            for i in range(img1.shape[0]):
                c, t = instance_accuracy(matches[i], nearest[i], overlap[i], g, args.eval_radius)
                bc, bt = bc + c, bt + t
            correct, total = correct + bc, total + bt
            if bt:
                batch_accs.append(bc / bt)
        for i in range(img1.shape[0]):
            pairs += 1
            if args.show_pics and len(files) < args.show_nums:
                masked = attn[i].masked_fill(~overlap[i], float("-inf"))
                k = min(args.topk, int(overlap[i].sum()))
                queries = masked.topk(k).indices
                fig = _figure(img1[i], img2[i], queries, matches[i][queries], g, args.patch_size,
                              attn[i] if args.show_with_attn else None)
                name = os.path.join(args.output_path, f"{args.sample_type}_corresp{len(files)}_cls"
                                                      f"{int(labels[i])}_nh0.png")
                files.append(save_image(fig, name))
            if (args.show_pics and len(files) >= args.show_nums) or (args.max_pairs and pairs >= args.max_pairs):
                done = True
                break
        if done:
            break
    acc = float(np.mean(batch_accs)) if batch_accs else None
    if args.sample_type == "instance":
        print(f"Correspondence accuracy (radius {args.eval_radius}) over {pairs} pairs: "
              + (f"{100 * acc:.2f}% (mean over batches; {correct}/{total} overlapping patches)" if acc is not None
                 else "n/a (no overlapping patch)"))
    print(f"{len(files)} figures written to {args.output_path}")
    return {"files": files, "accuracy": acc, "correct": correct, "total": total, "pairs": pairs}


if __name__ == "__main__":
    main()
