"""Linear probe on frozen features, one learning rate (official ``eval_linear.py``, evaluation.md §2.3).

    python evaluation/eval_linear.py --arch vit_small --n_last_blocks 4 --avgpool_patchtokens 0 \
        --pretrained_weights ckpt.pth --checkpoint_key teacher --data_path /data/imagenet --output_dir out
    torchrun --nproc_per_node 8 evaluation/eval_linear.py ...      # several GPUs

Protocol: frozen backbone in eval mode under no_grad, features of §1.4 (``--n_last_blocks``,
``--avgpool_patchtokens``), one ``nn.Linear`` (weight ~ N(0, 0.01²), bias 0), SGD momentum 0.9,
weight decay 0, lr = ``--lr`` × total batch / 256, ``CosineAnnealingLR(T_max=epochs, eta_min=0)``
stepped per epoch, cross-entropy; train transform RandomResizedCrop + flip, val transform resize
(bicubic) + centre crop. Validation every ``--val_freq`` epochs and at the end; the best val top-1
is reported. When the top-1 is ≥ the best so far, rank 0 appends a JSON line to
``output_dir/log.txt`` and writes ``checkpoint_<key>_linear.pth`` (``epoch``, ``state_dict`` with
official ``module.linear.*`` keys, ``optimizer``, ``scheduler``, ``best_acc``) plus
``best_<key>.json``.

This module also holds the machinery shared with ``eval_linear_multi.py`` (several heads trained
together on the same features).

Differences from the official script: CPU runs work (gloo / no process group); ``--num_labels``
defaults to the number of class folders; ``--resize_size`` / ``--crop_size`` (256 / 224 officially
hard-coded) for small images; the val set is sharded across ranks (sums are all-reduced, each image
counted once); the process group is initialised once for a comma list of keys; data folders are
checked before any work; weights are loaded strictly (see ``ibot.eval.weights``).
"""
import argparse
import copy
import json
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.utils.distributed import init_distributed_once, shutdown_distributed
from ibot.eval.features import (build_backbone, check_image_folder, dist_ready, eval_transform, feature_dim,
                           frozen_features, image_folder, make_loader, train_transform)
from ibot.utils.misc import bool_flag, fix_random_seeds, print_run_header
from ibot.train.optim import LARS
from ibot.eval.weights import load_pretrained_weights

__all__ = ["LinearClassifier", "LARS", "HeadSpec", "build_linear_heads", "get_args_parser", "main", "run_linear",
           "build_linear_data", "train_one_epoch", "validate"]

ARCHS = ["vit_tiny", "vit_small", "vit_base", "vit_large", "swin_tiny", "swin_small", "swin_base", "swin_large"]


class LinearClassifier(nn.Module):
    """Linear layer on frozen features: (B, d) (or (B, ...) flattened) -> (B, num_labels) logits."""

    def __init__(self, dim, num_labels=1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(x.view(x.size(0), -1))


def build_linear_heads(specs, dim, num_labels, device, lr_scale, epochs, make_optimizer):
    """One ``LinearClassifier(dim, num_labels)`` per spec (DDP-wrapped under a process group), its
    optimizer ``make_optimizer(head, spec, spec.lr * lr_scale)`` and a per-epoch cosine schedule to 0.
    Returns ``(heads, optimizers, schedulers)``."""
    heads, optimizers, schedulers = [], [], []
    for spec in specs:
        head = LinearClassifier(dim, num_labels).to(device)
        if dist_ready():
            head = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
        opt = make_optimizer(head, spec, spec.lr * lr_scale)
        heads.append(head)
        optimizers.append(opt)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0))
    return heads, optimizers, schedulers


class HeadSpec:
    """One linear head of a sweep: base ``lr`` (before batch scaling), ``wd`` and ``optim`` ('sgd'|'lars')."""

    def __init__(self, lr, wd=0.0, optim="sgd"):
        self.lr, self.wd, self.optim = lr, wd, optim

    def as_dict(self):
        return {"lr": self.lr, "wd": self.wd, "optimizer": self.optim}


def get_args_parser(add_help=True, multi=False):
    """Official ``eval_linear.py`` flags (+ ``--resize_size``, ``--crop_size``); ``multi`` adds ``--sweep_lr_only``."""
    p = argparse.ArgumentParser("Evaluation with linear classification on ImageNet", add_help=add_help)
    p.add_argument("--n_last_blocks", default=4, type=int,
                   help="concatenate [CLS] tokens of the last n blocks (4 for ViT-S, 1 for ViT-B/L)")
    p.add_argument("--avgpool_patchtokens", default=0, choices=[0, 1, 2], type=int,
                   help="0: [CLS]; 1: mean of patch tokens; 2: both (2 for ViT-B/L)")
    p.add_argument("--arch", default="vit_small", type=str, choices=ARCHS)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--window_size", default=7, type=int)
    p.add_argument("--pretrained_weights", default="", type=str)
    p.add_argument("--checkpoint_key", default="teacher", type=str, help="key(s), comma-separated")
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--lr", default=0.001, type=float, help="lr for a total batch of 256 (scaled linearly)")
    p.add_argument("--batch_size_per_gpu", default=128, type=int)
    p.add_argument("--dist_url", default="env://", type=str)
    p.add_argument("--local_rank", "--local-rank", default=0, type=int, help="ignored (torchrun sets LOCAL_RANK)")
    p.add_argument("--data_path", default="/path/to/imagenet/", type=str)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--val_freq", default=1, type=int)
    p.add_argument("--output_dir", default=".", type=str)
    p.add_argument("--num_labels", default=None, type=int, help="default: number of class folders")
    p.add_argument("--load_from", default=None, type=str, help="checkpoint file name in output_dir to resume")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resize_size", default=256, type=int, help="val: shorter side after bicubic resize")
    p.add_argument("--crop_size", default=224, type=int, help="train RandomResizedCrop / val centre-crop size")
    if multi:
        p.add_argument("--sweep_lr_only", default=True, type=bool_flag,
                       help="only sweep lr (45 SGD heads, wd 0); false adds wd {0,1e-6} x {sgd,lars} (180 heads)")
    return p


class _ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, no padding (each sample is validated exactly once)."""

    def __init__(self, n, rank, world):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_linear_data(args):
    """Train/val loaders of ``args.data_path`` (train: augmented, shuffled, DistributedSampler; val:
    sharded without padding). Returns ``(train_loader, val_loader, num_labels)``."""
    for split in ("train", "val"):
        check_image_folder(os.path.join(args.data_path, split))
    train = image_folder(os.path.join(args.data_path, "train"), train_transform(args.crop_size), with_index=False)
    val = image_folder(os.path.join(args.data_path, "val"), eval_transform(args.resize_size, args.crop_size),
                       with_index=False)
    num_labels = len(train.classes)
    if args.num_labels is not None and args.num_labels < num_labels:
        raise ValueError(f"--num_labels {args.num_labels} < {num_labels} class folders in {args.data_path}/train")
    num_labels = args.num_labels or num_labels
    train_loader = make_loader(train, args.batch_size_per_gpu, args.num_workers, shuffle=True, seed=args.seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_ready() else (0, 1)
    val_loader = DataLoader(val, batch_size=args.batch_size_per_gpu, sampler=_ShardSampler(len(val), rank, world),
                            num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    return train_loader, val_loader, num_labels


def _make_optimizer(head, spec, lr):
    if spec.optim == "sgd":
        return torch.optim.SGD(head.parameters(), lr, momentum=0.9, weight_decay=spec.wd)
    if spec.optim == "lars":
        return LARS(head.parameters(), lr=lr, weight_decay=spec.wd, momentum=0.9, eta=0.001)
    raise ValueError(f"unknown optimizer {spec.optim!r}")


def train_one_epoch(model, heads, optimizers, loader, epoch, n_last_blocks, avgpool, device):
    """One epoch of every head on shared frozen features. Returns ``{"loss{i}": mean train loss}``."""
    for h in heads:
        h.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    sums = torch.zeros(len(heads), dtype=torch.float64)
    count = 0
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.no_grad():
            feats = frozen_features(model, images, n_last_blocks, avgpool)
        for i, (head, opt) in enumerate(zip(heads, optimizers)):
            loss = nn.functional.cross_entropy(head(feats), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums[i] += loss.item() * len(target)
        count += len(target)
    return {f"loss{i}" if len(heads) > 1 else "loss": float(s / max(count, 1)) for i, s in enumerate(sums)}


@torch.no_grad()
def validate(model, heads, loader, n_last_blocks, avgpool, device, num_labels):
    """Top-1/top-5 (percent) and loss of every head on the val set (all ranks reduced).

    Returns a list of ``{"acc1", "acc5", "loss"}`` dicts, one per head (acc5 only if ≥ 5 labels).
    """
    n_heads = len(heads)
    stats = torch.zeros(n_heads, 3, dtype=torch.float64, device=device)  # correct1, correct5, loss sum
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        feats = frozen_features(model, images, n_last_blocks, avgpool)
        for i, head in enumerate(heads):
            module = head.module if isinstance(head, nn.parallel.DistributedDataParallel) else head
            module.eval()
            out = module(feats)
            stats[i, 2] += nn.functional.cross_entropy(out, target, reduction="sum")
            top = out.topk(min(5, num_labels), dim=1).indices
            hit = top.eq(target.view(-1, 1))
            stats[i, 0] += hit[:, :1].sum()
            stats[i, 1] += hit.sum()
        count += len(target)
    if dist_ready():
        dist.all_reduce(stats)
        dist.all_reduce(count)
    n = max(count.item(), 1.0)
    res = []
    for i in range(n_heads):
        r = {"acc1": stats[i, 0].item() * 100.0 / n, "loss": stats[i, 2].item() / n}
        if num_labels >= 5:
            r["acc5"] = stats[i, 1].item() * 100.0 / n
        res.append(r)
    return res


def _head_state(heads):
    """Official key layout: single head ``module.linear.*``; several heads ``<i>.module.linear.*``."""
    def plain(h):
        return h.module if isinstance(h, nn.parallel.DistributedDataParallel) else h
    if len(heads) == 1:
        return {"module." + k: v for k, v in plain(heads[0]).state_dict().items()}
    return {f"{i}.module.{k}": v for i, h in enumerate(heads) for k, v in plain(h).state_dict().items()}


def _load_head_state(heads, state):
    def plain(h):
        return h.module if isinstance(h, nn.parallel.DistributedDataParallel) else h
    for i, h in enumerate(heads):
        prefix = "module." if len(heads) == 1 else f"{i}.module."
        plain(h).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def run_linear(args, specs, multi=False):
    """Train ``len(specs)`` linear heads together on the frozen features of one checkpoint key.

    Args:
        args: parsed flags (``args.checkpoint_key`` is a single key; ``args.device`` set).
        specs: list of :class:`HeadSpec` (one for eval_linear, the grid for eval_linear_multi).
        multi: write the multi-head checkpoint layout (``optimizers``/``schedulers`` lists, ``best_acc_hidx``).
    Returns:
        dict with ``best_acc`` (max val top-1 over validated epochs and heads, percent), ``best_epoch``,
        ``best_head`` (index), ``best_config`` (lr/wd/optimizer), ``best_acc_sweep_lr_only``,
        ``last`` (per-head stats at the last validated epoch), ``feature_dim``.
    """
    device = args.device
    rank0 = (not dist_ready()) or dist.get_rank() == 0
    world = dist.get_world_size() if dist_ready() else 1
    fix_random_seeds(args.seed)
    train_loader, val_loader, num_labels = build_linear_data(args)
    model = build_backbone(args.arch, args.patch_size, args.window_size, args.avgpool_patchtokens,
                           img_size=args.crop_size)
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    dim = feature_dim(model, args.n_last_blocks, args.avgpool_patchtokens, args.crop_size, device)
    print(f"Model {args.arch} built; feature dim {dim}, {num_labels} labels, {len(specs)} head(s).")

    scale = args.batch_size_per_gpu * world / 256.0
    heads, optimizers, schedulers = build_linear_heads(specs, dim, num_labels, device, scale, args.epochs,
                                                       _make_optimizer)

    key = args.checkpoint_key
    ckpt_path = os.path.join(args.output_dir, f"checkpoint_{key}_linear.pth")
    best_path = os.path.join(args.output_dir, f"best_{key}.json")
    start_epoch, best = 0, {"best_acc": -1.0, "best_epoch": None, "best_head": None, "best_acc_sweep_lr_only": -1.0}
    if args.load_from:
        state = safe_load(os.path.join(args.output_dir, args.load_from))
        _load_head_state(heads, state["state_dict"])
        opt_states = state["optimizers"] if multi else [state["optimizer"]]
        sch_states = state["schedulers"] if multi else [state["scheduler"]]
        for o, s in zip(optimizers, opt_states):
            o.load_state_dict(s)
        for sc, s in zip(schedulers, sch_states):
            sc.load_state_dict(s)
        start_epoch = int(state["epoch"])
        best["best_acc"] = float(state["best_acc"])
        best["best_head"] = state.get("best_acc_hidx", 0)
        best["best_acc_sweep_lr_only"] = float(state.get("best_acc_sweep_lr_only", -1.0))
        print(f"Resumed from {args.load_from} at epoch {start_epoch} (best acc {best['best_acc']:.2f})")

    per_lr = max(1, len(specs) // len({s.lr for s in specs}))  # heads per lr (|wd|·|optim|)
    last = None
    for epoch in range(start_epoch, args.epochs):
        train_stats = train_one_epoch(model, heads, optimizers, train_loader, epoch, args.n_last_blocks,
                                      args.avgpool_patchtokens, device)
        for sc in schedulers:
            sc.step()
        if not (epoch % args.val_freq == 0 or epoch == args.epochs - 1):
            continue
        stats = validate(model, heads, val_loader, args.n_last_blocks, args.avgpool_patchtokens, device, num_labels)
        last = stats
        accs = [s["acc1"] for s in stats]
        hidx = max(range(len(accs)), key=lambda i: (accs[i], i))  # ties go to the later head (official)
        lr_only = max(accs[i] for i in range(0, len(accs), per_lr))
        for i, (spec, s) in enumerate(zip(specs, stats)):
            if multi:
                print(f"Epoch {epoch} head {i} lr {spec.lr:.1e} wd {spec.wd:.0e} {spec.optim}: "
                      f"top-1 {s['acc1']:.2f}" + (f" top-5 {s['acc5']:.2f}" if "acc5" in s else ""))
        print(f"Accuracy at epoch {epoch} of the network on the {len(val_loader.dataset)} test images: "
              f"{accs[hidx]:.1f}%")
        best["best_acc_sweep_lr_only"] = max(best["best_acc_sweep_lr_only"], lr_only)
        if accs[hidx] >= best["best_acc"]:
            best.update(best_acc=accs[hidx], best_epoch=epoch, best_head=hidx)
            if rank0:
                log = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                       **({f"test_acc{i}@1": s["acc1"] for i, s in enumerate(stats)} if multi else
                          {f"test_{k}": v for k, v in stats[0].items()})}
                with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                    f.write(json.dumps(log) + "\n")
                save = {"epoch": epoch + 1, "state_dict": _head_state(heads), "best_acc": best["best_acc"]}
                if multi:
                    save.update(optimizers=[o.state_dict() for o in optimizers],
                                schedulers=[s.state_dict() for s in schedulers], best_acc_hidx=hidx,
                                best_acc_sweep_lr_only=best["best_acc_sweep_lr_only"])
                else:
                    save.update(optimizer=optimizers[0].state_dict(), scheduler=schedulers[0].state_dict())
                atomic_save(save, ckpt_path)
        print(f"Max accuracy so far: {best['best_acc']:.2f}%"
              + (f" (lr-only heads: {best['best_acc_sweep_lr_only']:.2f}%)" if multi else ""))
        if rank0:
            summary = {"checkpoint_key": key, "best_acc": best["best_acc"], "best_epoch": best["best_epoch"],
                       "best_head": best["best_head"],
                       "best_config": specs[best["best_head"]].as_dict() if best["best_head"] is not None else None,
                       "best_acc_sweep_lr_only": best["best_acc_sweep_lr_only"], "feature_dim": dim,
                       "num_labels": num_labels, "epochs_done": epoch + 1}
            with open(best_path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(best_path + ".tmp", best_path)
    cfg = specs[best["best_head"]].as_dict() if best["best_head"] is not None else None
    print(f"Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {best['best_acc']:.1f}" + (f" (best head: {cfg}, epoch {best['best_epoch']})" if multi else ""))
    return {**best, "best_config": cfg, "last": last, "feature_dim": dim, "num_labels": num_labels}


def setup(args):
    """Distributed set-up (once), git SHA and args printout, output dir and data checks."""
    init_distributed_once(args)
    print_run_header(args)
    for split in ("train", "val"):
        check_image_folder(os.path.join(args.data_path, split))
    os.makedirs(args.output_dir, exist_ok=True)


def main(args):
    """Single-lr linear probe for every key of ``args.checkpoint_key``. Returns ``{key: run_linear result}``."""
    setup(args)
    out = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()]:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        out[key] = run_linear(a, [HeadSpec(args.lr)], multi=False)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
