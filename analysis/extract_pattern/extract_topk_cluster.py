"""Semantic patterns of the projection head (official ``analysis/extract_pattern/extract_topk_cluster.py``,
evaluation.md §3.4).

    python analysis/extract_pattern/extract_topk_cluster.py --arch vit_small --patch_size 16 \
        --pretrained_path checkpoint.pth --checkpoint_key teacher --data_path data/imagenet/val \
        --save_path patterns/ --type patch --topk 36 --show_pics 20

Model: the ViT returning all tokens plus the iBOT head (3-layer MLP, hidden 2048, GELU, bottleneck
256, L2 normalisation, weight-normed prototypes, ``--out_dim``) applied to the [CLS] token and to
every patch token (shared head). Data: resize to ``img_size * 8 / 7`` (bicubic), centre crop
``img_size``, normalise; batches are ``(image, label, index)`` everywhere (official defect fixed).

1. **Memory bank** (logits without softmax, temperature or centre): ``patch``: per image and patch
   (max logit, argmax) -> ``[num_images, T, 2]``; ``cls``: the same for [CLS] -> ``[num_images, 2]``.
   Saved as ``<save_path>/memory_<type>.pth`` (``memory_bank``); an existing file for the same
   number of images is reused (extraction skipped).
2. **Cluster sizes** ``num_per_cluster[c]`` = number of patches (images) whose argmax is c, counted
   in ``--chunks`` chunks and saved back into the same file.
3. **Selection** for the ``--show_pics`` largest clusters (descending size):
   ``patch``: per image, the largest max-logit among its patches assigned to c and where it is; the
   top 2·topk images; each gives a ``patch_window`` x ``patch_window``-patch crop of the
   un-normalised centre crop centred on that patch (zero-padded past the border), the centre patch
   covered by a semi-transparent orange box (RGBA 200, 100, 0, 127); crops whose mean HSV value is
   <= ``--min_brightness`` (40) are skipped; the first ``topk`` are kept. ``cls``: the top-``topk``
   images by max logit among the images assigned to c, whole.
   Written as ``<save_path>/c<type>_crank<rank>_cid<cluster>_top<topk>.jpg``: a
   ceil(sqrt(topk)) x ceil(sqrt(topk)) grid (2-px black gaps; empty cells black).

Weights: ``ckpt[--checkpoint_key]`` of a full pre-training checkpoint (teacher: ``backbone.*``/``head.*``;
student: ``module.backbone.*``/``module.head.*``); leading ``module.`` / ``_orig_mod.`` prefixes are
removed for both (official defect fixed) and any missing or unexpected key is an error. When the
checkpoint's patch prototypes (``last_layer2``) differ from the [CLS] ones (a student trained
without ``--shared_head``), the head keeps both and the patch type uses ``last_layer2``. Head options
(``norm_in_head``, ``act_in_head``, ``patch_out_dim``) are taken from the checkpoint's ``args`` when
present.

Deviation: a single process (no torch.distributed launch; the official all-gather only rebuilt the
same bank).
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ibot.eval.features import image_folder
from ibot.eval.flags import backbone_parser, data_parser, device_parser
from ibot.eval.weights import PretrainedWeightsError, select_state_dict, strip_prefixes
from ibot.viz.drawing import IMAGENET_MEAN, IMAGENET_STD, image_grid, paste_box, patch_window_crop, save_image, \
    to_uint8
from ibot.models import MultiCropWrapper, create_backbone, iBOTHead
from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.viz.loading import pick_device

__all__ = ["get_args_parser", "build_model", "extract_memory_bank", "cluster_sizes", "select_patch_cluster",
           "select_cls_cluster", "main"]


def get_args_parser():
    """Official flags (+ ``--min_brightness``, ``--num_workers``, ``--device``)."""
    p = argparse.ArgumentParser("Extract the top-k patches / images of the largest head clusters", parents=[
        backbone_parser(patch_size=16, window_size=None, family="vit", pretrained_weights=False),
        data_parser(data_path="/path/to/imagenet/val", batch_size=32, batch_flag="--batch_size", num_workers=0),
        device_parser()])
    p.add_argument("--pretrained_path", default="", type=str)
    p.add_argument("--save_path", default="", type=str, help="output directory")
    p.add_argument("--img_size", default=224, type=int)
    p.add_argument("--patch_window", default=5, type=int)
    p.add_argument("--out_dim", default=8192, type=int)
    p.add_argument("--type", default="patch", type=str, choices=["patch", "cls"])
    p.add_argument("--topk", default=196, type=int)
    p.add_argument("--show_pics", default=100, type=int)
    p.add_argument("--chunks", default=16, type=int)
    p.add_argument("--min_brightness", default=40.0, type=float, help="skip patch crops with mean HSV V <= this")
    return p


def build_model(args):
    """MultiCropWrapper(ViT returning all tokens, iBOTHead) with the checkpoint loaded (see module doc).

    Returns the wrapper in eval mode (random init, with a warning, when ``--pretrained_path`` is empty).
    """
    backbone = create_backbone(args.arch, patch_size=args.patch_size, img_size=args.img_size, return_all_tokens=True)
    sd, ck_args = None, None
    if args.pretrained_path:
        ckpt = safe_load(args.pretrained_path)
        sd, where = select_state_dict(ckpt, args.checkpoint_key, source=args.pretrained_path)
        sd = strip_prefixes(sd, ("module.", "_orig_mod."))
        ck_args = ckpt.get("args") if isinstance(ckpt, dict) else None
        if not any(k.startswith("head.") for k in sd):
            raise PretrainedWeightsError(f"{args.pretrained_path}{where} has no projection head (head.*): "
                                         f"pass a full pre-training checkpoint, not a backbone file")
        sd.pop("backbone.masked_embed", None)
    shared = True
    if sd is not None:
        v1, v2 = sd.get("head.last_layer.weight_v"), sd.get("head.last_layer2.weight_v")
        if v2 is not None and v1 is not None and (v1.shape != v2.shape or not torch.equal(v1, v2)):
            shared = False
            print("The checkpoint has separate patch prototypes (last_layer2): used for --type patch.")
    kw = {}
    if ck_args is not None:
        for name, key in (("norm_in_head", "norm"), ("act_in_head", "act")):
            if getattr(ck_args, name, None) is not None:
                kw[key] = getattr(ck_args, name)
    patch_dim = args.out_dim
    if not shared and ck_args is not None and getattr(ck_args, "patch_out_dim", None):
        patch_dim = ck_args.patch_out_dim
    head = iBOTHead(backbone.embed_dim, args.out_dim, patch_out_dim=patch_dim, shared_head=shared, **kw)
    model = MultiCropWrapper(backbone, head)
    if sd is None:
        print("WARNING: no --pretrained_path: the head and backbone are RANDOMLY initialised")
    else:
        own = model.state_dict()
        mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                      if k in own and own[k].shape != v.shape]
        if mismatched:
            raise PretrainedWeightsError(f"{args.pretrained_path}: shape mismatches (key, checkpoint, model) "
                                         f"{mismatched[:6]} (check --arch, --patch_size, --out_dim)")
        res = model.load_state_dict(sd, strict=False)
        missing = [k for k in res.missing_keys if not (shared and k.startswith("head.last_layer2."))]
        if missing or res.unexpected_keys:
            raise PretrainedWeightsError(f"{args.pretrained_path}: missing keys {missing}, unexpected keys "
                                         f"{res.unexpected_keys} (check --arch / --patch_size / --checkpoint_key)")
        print(f"Loaded {len(sd)} tensors from {args.pretrained_path}{where}")
    return model.eval()


@torch.no_grad()
def extract_memory_bank(model, loader, num_images, kind, device):
    """Head max-logit / argmax of every patch (or [CLS]) of every image.

    Args:
        model: MultiCropWrapper(ViT, iBOTHead); loader: batches ``(images, labels, indices)``.
        kind: ``'patch'`` or ``'cls'``.
    Returns:
        float tensor ``[num_images, T, 2]`` (patch) or ``[num_images, 2]`` (cls); ``[..., 0]`` = max
        logit, ``[..., 1]`` = argmax (stored as float), row = dataset index.
    """
    bank, seen = None, torch.zeros(num_images, dtype=torch.bool)
    for images, _, index in loader:
        tokens = model.backbone(images.to(device), return_all_tokens=True)
        h = model.head.bottleneck(tokens)
        logits = model.head.patch_logits(h[:, 1:]) if kind == "patch" else model.head.cls_logits(h[:, 0])
        value, arg = logits.float().max(-1)
        entry = torch.stack([value, arg.float()], -1).cpu()
        if bank is None:
            bank = torch.zeros((num_images,) + tuple(entry.shape[1:]))
        bank[index] = entry
        seen[index] = True
    if bank is None or not bool(seen.all()):
        raise RuntimeError("the memory bank does not cover the whole data set")
    return bank


def cluster_sizes(assign, num_clusters, chunks=16):
    """Count the assignments per cluster, ``chunks`` slices at a time.

    Args:
        assign: (N, ...) argmax indices (float or int). Returns (num_clusters,) int64 counts.
    """
    flat = assign.reshape(-1).long()
    counts = torch.zeros(num_clusters, dtype=torch.long)
    for part in torch.chunk(flat, max(1, chunks)):
        counts += torch.bincount(part, minlength=num_clusters)[:num_clusters]
    return counts


def select_patch_cluster(bank, cluster, n):
    """Best patch of every image for ``cluster`` and the ``n`` best images.

    Args:
        bank: ``[N, T, 2]`` memory bank; n: number of images wanted (2·topk officially).
    Returns:
        list of ``(image index, patch position, value)`` sorted by value (descending); images without
        a patch assigned to ``cluster`` are left out.
    """
    value = torch.where(bank[..., 1].long() == cluster, bank[..., 0], torch.full_like(bank[..., 0], -math.inf))
    best, pos = value.max(1)                                              # (N,)
    order = torch.argsort(best, descending=True)
    out = []
    for i in order.tolist():
        if not math.isfinite(float(best[i])) or len(out) >= n:
            break
        out.append((i, int(pos[i]), float(best[i])))
    return out


def select_cls_cluster(bank, cluster, n):
    """Top-``n`` images by max logit among those whose [CLS] argmax is ``cluster``: list of
    ``(image index, value)`` (``bank``: ``[N, 2]``)."""
    idx = torch.nonzero(bank[:, 1].long() == cluster).flatten()
    order = idx[torch.argsort(bank[idx, 0], descending=True)][:n]
    return [(int(i), float(bank[i, 0])) for i in order]


def _hsv_value(crop):
    return float(np.asarray(Image.fromarray(crop).convert("HSV"))[..., 2].mean())


def main(argv=None):
    """Run the tool. Returns ``{'memory_file', 'num_per_cluster', 'files', 'clusters'}``."""
    args = get_args_parser().parse_args(argv)
    if not args.save_path:
        raise SystemExit("--save_path (output directory) is required")
    os.makedirs(args.save_path, exist_ok=True)
    device = pick_device(args.device)
    resize = int(args.img_size / 7 * 8)
    base = [transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC), transforms.CenterCrop(args.img_size)]
    dataset = image_folder(args.data_path, transforms.Compose(
        base + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]), with_index=True)
    raw = image_folder(args.data_path, transforms.Compose(base + [transforms.ToTensor()]), with_index=True)
    n = len(dataset)
    mem_file = os.path.join(args.save_path, f"memory_{args.type}.pth")
    state = safe_load(mem_file) if os.path.isfile(mem_file) else {}
    bank = state.get("memory_bank")
    if bank is not None and bank.shape[0] == n:
        print(f"Memory bank found at {mem_file}: extraction skipped")
    else:
        model = build_model(args).to(device)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
        bank = extract_memory_bank(model, loader, n, args.type, device)
        state = {"memory_bank": bank}
        atomic_save(state, mem_file)
        print(f"Memory bank {tuple(bank.shape)} saved to {mem_file}")
    num_clusters = max(args.out_dim, int(bank[..., 1].max()) + 1)
    counts = cluster_sizes(bank[..., 1], num_clusters, args.chunks)
    state["num_per_cluster"] = counts
    atomic_save(state, mem_file)

    grid_side = int(round(math.sqrt(bank.shape[1]))) if args.type == "patch" else None
    ncol = math.ceil(math.sqrt(args.topk))
    order = [int(c) for c in torch.argsort(counts, descending=True, stable=True) if counts[c] > 0][:args.show_pics]
    files = []
    for rank, c in enumerate(order):
        cells = []
        if args.type == "patch":
            size = args.patch_window * args.patch_size
            for i, pos, _ in select_patch_cluster(bank, c, 2 * args.topk):
                row, col = divmod(pos, grid_side)
                img = to_uint8(raw[i][0])
                crop = patch_window_crop(img, row, col, args.patch_size, args.patch_window)
                if _hsv_value(crop) <= args.min_brightness:
                    continue
                off = (args.patch_window // 2) * args.patch_size
                cells.append(paste_box(crop, off, off, args.patch_size))
                if len(cells) >= args.topk:
                    break
            cell_hw = (size, size)
        else:
            cells = [to_uint8(raw[i][0]) for i, _ in select_cls_cluster(bank, c, args.topk)]
            cell_hw = (args.img_size, args.img_size)
        grid = image_grid(cells, ncol, pad=2, pad_value=0, cell_hw=cell_hw, nrow=ncol)
        path = os.path.join(args.save_path, f"c{args.type}_crank{rank}_cid{c}_top{args.topk}.jpg")
        files.append(save_image(grid, path))
        print(f"cluster {c} ({int(counts[c])} {'patches' if args.type == 'patch' else 'images'}): {len(cells)} cells -> {path}")
    return {"memory_file": mem_file, "num_per_cluster": counts, "files": files, "clusters": order}


if __name__ == "__main__":
    main()
