"""Part-wise linear probing on the most-attended patches (official ``analysis/linear_part/eval.py``,
evaluation.md §3.5).

    python analysis/linear_part/eval.py --arch vit_small --pretrained_weights ckpt.pth \
        --data_path data/imagenet --output_dir .linear_part --topk 4
    torchrun --nproc_per_node 8 analysis/linear_part/eval.py ...

The ``eval_linear_multi`` protocol (45-lr SGD sweep, or 180 heads with ``--sweep_lr_only false``,
cosine schedule, 100 epochs, same transforms, log and ``checkpoint_<key>_linear.pth`` layout) with
another feature: the ViT is built with ``use_mean_pooling=True`` (final norm = identity, pretrained
``norm`` dropped); the last block's attention (computed on that block's input) gives [CLS] -> patch
weights averaged over heads; the ``--topk`` patches with the largest average (smallest with
``--reverse_top true``) are selected and the feature is the **mean of those patch tokens** of the
last block output (dimension D).

Differences from the official script: ``--reverse_top`` is a real boolean flag (the official
``type=bool`` turned "False" into True); the training, validation and checkpoint code is
``ibot.eval.linear``'s, as for ``evaluation/eval_linear.py`` (CPU runs, sharded validation, optimiser/scheduler states restored on
resume, best head over all epochs). run.sh's part-linear loop (topk 1, 7, 14, 56, 112, 196) should
call this file (the official path ``eval_linear_part_multi.py`` does not exist).
"""
import argparse
import copy
import json
import logging
import os

import torch
from torch import nn

from ibot.eval.features import build_backbone
from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser, linear_probe_parser
from ibot.eval.linear import (build_linear_data, build_linear_heads, head_specs, head_state_dict,
                              load_head_state_dict, make_head_optimizer, setup_linear_run, train_heads_one_epoch,
                              validate_heads)
from ibot.eval.weights import load_pretrained_weights
from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.utils.distributed import get_world_size, is_main_process
from ibot.utils.misc import bool_flag, fix_random_seeds

__all__ = ["PartFeatures", "get_args_parser", "run_part_linear", "main"]


class PartFeatures(nn.Module):
    """Feature adaptor: exposes ``get_intermediate_layers`` so that the shared linear-probe code with
    ``avgpool_patchtokens=1`` computes the mean of the top-k attended patch tokens.

    ``get_intermediate_layers(x (B, 3, H, W), n)`` -> ``[tokens (B, 1 + k, D)]``: token 0 is the
    [CLS] output, tokens 1..k the selected patch tokens of the last block (un-normed when the
    backbone was built with ``use_mean_pooling=True``). ``selected(x)`` returns the (B, k) indices.
    """

    def __init__(self, backbone, topk=4, reverse_top=False):
        super().__init__()
        self.backbone, self.topk, self.reverse_top = backbone, int(topk), bool(reverse_top)

    def _forward(self, x):
        b = self.backbone
        t = b.prepare_tokens(x)
        for blk in b.blocks[:-1]:
            t = blk(t)
        attn = b.blocks[-1](t, return_attention=True)                     # (B, nh, N, N), on the block input
        t = b.norm(b.blocks[-1](t))
        weights = attn[:, :, 0, 1:].mean(1)                               # (B, T)
        k = min(self.topk, weights.shape[1])
        idx = weights.topk(k, dim=1, largest=not self.reverse_top).indices
        return t, idx

    def selected(self, x):
        """(B, k) indices (in 0..T-1) of the selected patches of ``x (B, 3, H, W)``."""
        return self._forward(x)[1]

    def get_intermediate_layers(self, x, n=1):
        """x (B, 3, H, W) -> ``[(B, 1 + k, D)]`` ([CLS] output + the k selected patch tokens); n ignored."""
        t, idx = self._forward(x)
        sel = torch.gather(t[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return [torch.cat([t[:, :1], sel], dim=1)]


def get_args_parser():
    """``eval_linear_multi`` flags plus ``--topk`` (4) and ``--reverse_top`` (false)."""
    p = argparse.ArgumentParser(
        "Evaluation with linear classification on ImageNet",
        parents=[backbone_parser(), features_parser(n_last_blocks=4), data_parser(image_sizes=True), launch_parser(),
                 linear_probe_parser(multi=True)])
    p.add_argument("--topk", default=4, type=int, help="number of most-attended patches averaged")
    p.add_argument("--reverse_top", default=False, type=bool_flag, help="take the least-attended patches")
    return p


def run_part_linear(args):
    """Train the head sweep for one checkpoint key (``args.checkpoint_key``; ``args.device`` set).

    Returns ``{'best_acc', 'best_epoch', 'best_head', 'best_config', 'feature_dim', 'num_labels'}``.
    """
    device = args.device
    rank0 = is_main_process()
    world = get_world_size()
    fix_random_seeds(args.seed)
    train_loader, val_loader, num_labels = build_linear_data(args)
    backbone = build_backbone(args.arch, args.patch_size, args.window_size, avgpool_patchtokens=1,
                              img_size=args.crop_size)
    if not hasattr(backbone, "get_last_selfattention"):
        raise SystemExit("part-wise probing needs a ViT (--arch vit_*)")
    load_pretrained_weights(backbone, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model = PartFeatures(backbone, args.topk, args.reverse_top).to(device).eval()
    dim = backbone.embed_dim
    specs = head_specs(args.sweep_lr_only)
    scale = args.batch_size_per_gpu * world / 256.0
    heads, optimizers, schedulers = build_linear_heads(specs, dim, num_labels, device, scale, args.epochs,
                                                       make_head_optimizer)

    key = args.checkpoint_key
    ckpt_path = os.path.join(args.output_dir, f"checkpoint_{key}_linear.pth")
    best = {"best_acc": -1.0, "best_epoch": None, "best_head": None}
    start = 0
    if args.load_from:
        state = safe_load(os.path.join(args.output_dir, args.load_from))
        load_head_state_dict(heads, state["state_dict"])
        for o, s in zip(optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sc, s in zip(schedulers, state["schedulers"]):
            sc.load_state_dict(s)
        start, best["best_acc"], best["best_head"] = int(state["epoch"]), float(state["best_acc"]), state["best_acc_hidx"]
    print(f"Part-wise probe: {args.arch}, top-{args.topk} {'least' if args.reverse_top else 'most'}-attended "
          f"patches, feature dim {dim}, {num_labels} labels, {len(specs)} heads")
    for epoch in range(start, args.epochs):
        train_stats = train_heads_one_epoch(model, heads, optimizers, train_loader, epoch, 1, 1, device)
        for sc in schedulers:
            sc.step()
        if not (epoch % args.val_freq == 0 or epoch == args.epochs - 1):
            continue
        stats = validate_heads(model, heads, val_loader, 1, 1, device, num_labels)
        accs = [s["acc1"] for s in stats]
        hidx = max(range(len(accs)), key=lambda i: (accs[i], i))
        print(f"Epoch {epoch}: best head {hidx} ({specs[hidx].as_dict()}) top-1 {accs[hidx]:.2f}%")
        if accs[hidx] >= best["best_acc"]:
            best.update(best_acc=accs[hidx], best_epoch=epoch, best_head=hidx)
            if rank0:
                log = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                       **{f"test_acc{i}@1": a for i, a in enumerate(accs)}}
                with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                    f.write(json.dumps(log) + "\n")
                atomic_save({"epoch": epoch + 1,
                             "state_dict": head_state_dict(heads),
                             "optimizers": [o.state_dict() for o in optimizers],
                             "schedulers": [s.state_dict() for s in schedulers],
                             "best_acc": best["best_acc"], "best_acc_hidx": hidx,
                             "best_acc_sweep_lr_only": max(accs[i] for i in range(0, len(accs), max(1, len(specs) // 45)))},
                            ckpt_path)
        print(f"Max accuracy so far: {best['best_acc']:.2f}%")
    cfg = specs[best["best_head"]].as_dict() if best["best_head"] is not None else None
    print(f"Part-wise linear probing (top-{args.topk}) completed. Top-1 test accuracy: {best['best_acc']:.1f} "
          f"(head {cfg}, epoch {best['best_epoch']})")
    return {**best, "best_config": cfg, "feature_dim": dim, "num_labels": num_labels}


def main(argv=None):
    """Run for every key of ``--checkpoint_key`` (comma list). Returns ``{key: run_part_linear result}``."""
    args = get_args_parser().parse_args(argv)
    setup_linear_run(args)
    out = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()]:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        out[key] = run_part_linear(a)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
