"""Linear probes on frozen features (evaluation.md §2.3 and §2.4), shared by ``evaluation/eval_linear.py``,
``evaluation/eval_linear_multi.py`` and ``analysis/linear_part/eval.py``.

Protocol: frozen backbone in eval mode under no_grad, features of §1.4, ``nn.Linear`` heads (weight ~
N(0, 0.01²), bias 0), each with its own optimiser (SGD momentum 0.9 or LARS) at lr = base lr × total
batch / 256 and ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped per epoch, cross-entropy; the
features of a batch are computed once and shared by all heads. :func:`run_linear` trains and
validates the heads of one checkpoint key and writes ``log.txt``, ``checkpoint_<key>_linear.pth``
(official key layout) and ``best_<key>.json``.
"""
import json
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ibot.eval.features import (build_backbone, check_image_folder, eval_transform, feature_dim, frozen_features,
                                image_folder, make_loader, train_transform)
from ibot.eval.weights import load_pretrained_weights
from ibot.train.optim import LARS
from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.utils.distributed import (all_reduce_sum, get_rank, get_world_size, init_distributed_once,
                                    is_dist_avail_and_initialized, is_main_process)
from ibot.utils.misc import fix_random_seeds, print_run_header

__all__ = ["LinearClassifier", "HeadSpec", "build_linear_heads", "ShardSampler", "build_linear_data",
           "make_head_optimizer", "train_heads_one_epoch", "validate_heads", "head_state_dict",
           "load_head_state_dict", "run_linear", "lr_grid", "head_specs", "setup_linear_run", "LARS"]


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
        if is_dist_avail_and_initialized():
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


class ShardSampler(Sampler):
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
    rank, world = get_rank(), get_world_size()
    val_loader = DataLoader(val, batch_size=args.batch_size_per_gpu, sampler=ShardSampler(len(val), rank, world),
                            num_workers=args.num_workers, pin_memory=torch.cuda.is_available())
    return train_loader, val_loader, num_labels


def make_head_optimizer(head, spec, lr):
    """SGD (momentum 0.9) or LARS (eta 0.001) over ``head`` at ``lr`` with the spec's weight decay."""
    if spec.optim == "sgd":
        return torch.optim.SGD(head.parameters(), lr, momentum=0.9, weight_decay=spec.wd)
    if spec.optim == "lars":
        return LARS(head.parameters(), lr=lr, weight_decay=spec.wd, momentum=0.9, eta=0.001)
    raise ValueError(f"unknown optimizer {spec.optim!r}")


def train_heads_one_epoch(model, heads, optimizers, loader, epoch, n_last_blocks, avgpool, device):
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
def validate_heads(model, heads, loader, n_last_blocks, avgpool, device, num_labels):
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
    all_reduce_sum(stats)
    all_reduce_sum(count)
    n = max(count.item(), 1.0)
    res = []
    for i in range(n_heads):
        r = {"acc1": stats[i, 0].item() * 100.0 / n, "loss": stats[i, 2].item() / n}
        if num_labels >= 5:
            r["acc5"] = stats[i, 1].item() * 100.0 / n
        res.append(r)
    return res


def head_state_dict(heads):
    """Official key layout: single head ``module.linear.*``; several heads ``<i>.module.linear.*``."""
    def plain(h):
        return h.module if isinstance(h, nn.parallel.DistributedDataParallel) else h
    if len(heads) == 1:
        return {"module." + k: v for k, v in plain(heads[0]).state_dict().items()}
    return {f"{i}.module.{k}": v for i, h in enumerate(heads) for k, v in plain(h).state_dict().items()}


def load_head_state_dict(heads, state):
    """Inverse of :func:`head_state_dict`: load ``state`` into ``heads`` (official key layout)."""
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
    rank0 = is_main_process()
    world = get_world_size()
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
                                                       make_head_optimizer)

    key = args.checkpoint_key
    ckpt_path = os.path.join(args.output_dir, f"checkpoint_{key}_linear.pth")
    best_path = os.path.join(args.output_dir, f"best_{key}.json")
    start_epoch, best = 0, {"best_acc": -1.0, "best_epoch": None, "best_head": None, "best_acc_sweep_lr_only": -1.0}
    if args.load_from:
        state = safe_load(os.path.join(args.output_dir, args.load_from))
        load_head_state_dict(heads, state["state_dict"])
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
        train_stats = train_heads_one_epoch(model, heads, optimizers, train_loader, epoch, args.n_last_blocks,
                                      args.avgpool_patchtokens, device)
        for sc in schedulers:
            sc.step()
        if not (epoch % args.val_freq == 0 or epoch == args.epochs - 1):
            continue
        stats = validate_heads(model, heads, val_loader, args.n_last_blocks, args.avgpool_patchtokens, device, num_labels)
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
                save = {"epoch": epoch + 1, "state_dict": head_state_dict(heads), "best_acc": best["best_acc"]}
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


def lr_grid():
    """The official 45 base learning rates: 1e-4, 2e-4, ..., 9e-4, 1e-3, ..., 9 (ascending)."""
    return [10 ** k * m for k in range(-4, 1) for m in range(1, 10)]


def head_specs(sweep_lr_only=True):
    """List of :class:`HeadSpec` in the official (lr, wd, optim) order (45 or 180 heads)."""
    wds = [0.0] if sweep_lr_only else [0.0, 1e-6]
    optims = ["sgd"] if sweep_lr_only else ["sgd", "lars"]
    return [HeadSpec(lr, wd, o) for lr in lr_grid() for wd in wds for o in optims]


def setup_linear_run(args):
    """Before any key runs: distributed set-up (once), git SHA and args printout, data checks, output dir."""
    init_distributed_once(args)
    print_run_header(args)
    for split in ("train", "val"):
        check_image_folder(os.path.join(args.data_path, split))
    os.makedirs(args.output_dir, exist_ok=True)
