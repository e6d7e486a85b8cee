"""Training and testing of the COCO detector (``evaluation/object_detection/{train,test}.py``).

Training follows the official runner: AdamW with layer decay (:mod:`ibot.dense.layer_decay`), a
step schedule (x0.1 at ``lr_steps``) with mmcv's linear warm-up (``warmup_iters``, ratio 0.001),
no gradient clipping, fp16/bf16 autocast on GPUs, DDP with SyncBatchNorm under ``torchrun``.

Records in ``--output_dir``: ``checkpoint.pth`` (model, optimizer, scaler, iteration, RNG states,
config, classes; written atomically every ``--save_every`` iterations and at every epoch end),
``log.txt`` (one JSON line per evaluation), ``results.json`` (final AP), ``tf_logs/`` (TensorBoard
losses, lr and AP), ``predictions.png`` (validation images with predicted boxes and masks), and a
progress line with ETA every ``--print_freq`` iterations.

Exact resume: the data order is a function of (seed, epoch), every augmentation of (seed, epoch,
index), the DataLoader worker seeds of a per-epoch generator, and the global RNG states are saved,
so a run killed at any time and resumed with ``--auto_resume true`` ends with the weights of an
uninterrupted run (CPU; GPU kernels may add non-determinism). SIGTERM saves a checkpoint after the
current step and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ibot.dense.layer_decay import layer_decay_param_groups
from ibot.detection.coco_eval import coco_evaluate, format_table, to_coco_results
from ibot.detection.dataset import CocoInstances, EpochIndexSampler, check_coco_layout, coco_paths
from ibot.detection.model import build_detector, postprocess
from ibot.detection.presets import PRESETS, DetectionConfig, describe, get_config
from ibot.detection.transforms import EvalTransform, TrainTransform, collate
from ibot.train.faults import StopOnSignal, capture_rng_state, restore_rng_state
from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.utils.distributed import get_rank, get_world_size, init_distributed_mode, is_main_process
from ibot.utils.metric_logger import MetricLogger, SmoothedValue
from ibot.utils.misc import bool_flag, fix_random_seeds, print_run_header

__all__ = ["add_common_args", "add_train_args", "config_from_args", "lr_factor", "train", "test",
           "evaluate", "draw_predictions"]

_OVERRIDES = ("arch", "patch_size", "batch_size_per_gpu", "img_scale", "detector", "lr", "layer_decay",
              "drop_path", "use_checkpoint", "amp", "epochs", "backbone_img_size", "frozen_stages")


# ---------------------------------------------------------------------------------------------- flags
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by train.py and test.py (preset, data, device)."""
    parser.add_argument("--preset", default="vit_small_1x", choices=sorted(PRESETS),
                        help="named settings (evaluation.md §2.12); the flags below override them")
    parser.add_argument("--arch", default=None, help="backbone (default: the preset's)")
    parser.add_argument("--patch_size", default=None, type=int)
    parser.add_argument("--data_path", default="data/coco", help="COCO 2017 root (annotations/, train2017/, val2017/)")
    parser.add_argument("--output_dir", default=".", help="where checkpoints, logs and pictures go")
    parser.add_argument("--img_scale", default=None, type=int,
                        help="test short side S (train short sides 0.6S..S, long side <= 5S/3); default the preset's")
    parser.add_argument("--batch_size_per_gpu", default=None, type=int, help="images per process")
    parser.add_argument("--detector", default=None, choices=("cascade_mask_rcnn", "mask_rcnn"))
    parser.add_argument("--use_cuda", default=True, type=bool_flag, help="false: run on the CPU")
    parser.add_argument("--amp", default=None, choices=("fp16", "bf16", "none"), help="autocast on GPUs")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--num_vis", default=4, type=int, help="validation images drawn in predictions.png")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of train.py only."""
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="pre-training checkpoint or backbone file; '' = random backbone")
    parser.add_argument("--checkpoint_key", default="teacher", type=str, help="entry of the checkpoint to load")
    parser.add_argument("--max_iters", default=None, type=int, help="total iterations (default: the preset's epochs)")
    parser.add_argument("--epochs", default=None, type=int)
    parser.add_argument("--lr", default=None, type=float)
    parser.add_argument("--layer_decay", default=None, type=float)
    parser.add_argument("--drop_path", default=None, type=float)
    parser.add_argument("--use_checkpoint", default=None, type=bool_flag, help="activation checkpointing")
    parser.add_argument("--frozen_stages", default=None, type=int,
                        help="-1 (official): train the whole backbone; k in 0..depth: freeze the patch embedding "
                             "and the first k blocks (depth: a frozen backbone, only pyramid, FPN and heads train)")
    parser.add_argument("--backbone_img_size", default=None, type=int, nargs=2, metavar=("H", "W"),
                        help="grid of the backbone's position embedding (official: 800 1008 for ViT-S)")
    parser.add_argument("--auto_resume", default=False, type=bool_flag, help="resume from output_dir/checkpoint.pth")
    parser.add_argument("--save_every", default=0, type=int, help="checkpoint every N iterations (0: each epoch)")
    parser.add_argument("--eval_every", default=0, type=int, help="evaluate every N iterations (0: each epoch)")
    parser.add_argument("--print_freq", default=20, type=int)
    return parser


def config_from_args(args: argparse.Namespace) -> DetectionConfig:
    """The preset of ``args.preset`` with the command-line overrides that were given."""
    overrides = {k: getattr(args, k, None) for k in _OVERRIDES}
    return get_config(args.preset, **overrides)


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(iteration: int, steps: List[int], warmup_iters: int, warmup_ratio: float, gamma: float = 0.1) -> float:
    """Multiplier of the base lr at 0-based ``iteration``: ``gamma ** (#steps <= iteration)`` times
    mmcv's linear warm-up ``1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)`` while
    ``iteration < warmup_iters``."""
    factor = gamma ** sum(iteration >= s for s in steps)
    if iteration < warmup_iters:
        factor *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return factor


def _schedule(cfg: DetectionConfig, iters_per_epoch: int, max_iters: Optional[int]):
    """(total iterations, lr step iterations): epochs scaled onto ``max_iters`` when it is given."""
    if max_iters is not None:
        return max_iters, [int(round(s / cfg.epochs * max_iters)) for s in cfg.lr_steps]
    return cfg.epochs * iters_per_epoch, [s * iters_per_epoch for s in cfg.lr_steps]


# ---------------------------------------------------------------------------------------------- helpers
def _device(args) -> torch.device:
    """Initialise the process (group) and return the device; ``--use_cuda false`` forces the CPU."""
    if not args.use_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # effective when CUDA is not initialised yet
    init_distributed_mode(args)
    if not args.use_cuda:
        args.device = torch.device("cpu")
    return args.device


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def _to_device(targets, device):
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def _loader(dataset, sampler, batch_size, num_workers, seed_generator):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=False, drop_last=False,
                                       generator=seed_generator, persistent_workers=False)


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, dataset: CocoInstances, device, cfg: DetectionConfig, num_workers: int = 0,
            indices: Optional[List[int]] = None) -> Dict[int, Dict[str, np.ndarray]]:
    """Detections of this rank's share of ``dataset`` (or of ``indices``) in original pixels.

    Returns ``{image_id: {'boxes', 'scores', 'labels', 'masks'}}`` (NumPy).
    """
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    if indices is None:
        sampler = EpochIndexSampler(len(dataset), shuffle=False, num_replicas=get_world_size(), rank=get_rank())
    else:
        sampler = [(0, i) for i in indices]
    loader = _loader(dataset, sampler, 1, num_workers, torch.Generator().manual_seed(0))
    out = {}
    for images, _, metas in loader:
        with _autocast(device, cfg.amp):
            results = net(images.to(device), [m["size"] for m in metas])
        for r, m in zip(results, metas):
            r = postprocess({k: v.float() if v.is_floating_point() else v for k, v in r.items()},
                            m["scale"], m["orig_size"], cfg.mask_threshold)
            out[int(m["image_id"])] = {k: v.cpu().numpy() for k, v in r.items()}
    net.train(was_training)
    return out


def evaluate(model, dataset: CocoInstances, device, cfg: DetectionConfig, num_workers: int = 0):
    """COCO box and mask AP of ``model`` on ``dataset`` (all ranks predict, rank 0 scores).

    Returns the dict of :func:`ibot.detection.coco_eval.coco_evaluate` on rank 0, None elsewhere.
    """
    local = predict(model, dataset, device, cfg, num_workers)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * get_world_size()
        dist.all_gather_object(gathered, local)
        local = {k: v for part in gathered for k, v in part.items()}
    if not is_main_process():
        return None
    results = {"bbox": [], "segm": []}
    for image_id in sorted(local):
        r = local[image_id]
        entry = to_coco_results(image_id, r["boxes"], r["scores"], r["labels"], dataset.cat_ids, r.get("masks"))
        results["bbox"] += entry["bbox"]
        results["segm"] += entry["segm"]
    return coco_evaluate(dataset.coco, results, dataset.img_ids)


def draw_predictions(model, dataset: CocoInstances, device, cfg: DetectionConfig, path: str, num_images: int = 4,
                     min_score: float = 0.3, min_side: int = 256) -> Optional[str]:
    """PNG grid of the first ``num_images`` validation images with predicted boxes, labels and masks.

    Detections with score >= ``min_score`` are drawn (the best one when none reaches it); small images
    are enlarged (nearest) so that one side is at least ``min_side`` px. Returns the path.
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ibot.viz.drawing import image_grid, save_image

    count = min(num_images, len(dataset))
    if count <= 0:
        return None
    preds = predict(model, dataset, device, cfg, indices=list(range(count)))
    panels = []
    for index in range(count):
        image_id = dataset.img_ids[index]
        image = torch.from_numpy(dataset.load_image(image_id).copy()).permute(2, 0, 1)
        r = preds[image_id]
        keep = r["scores"] >= min_score
        if not keep.any() and len(r["scores"]):
            keep[int(np.argmax(r["scores"]))] = True   # an image without a confident box shows its best one
        k = max(1, math.ceil(min_side / max(image.shape[1:])))
        big = image.repeat_interleave(k, 1).repeat_interleave(k, 2)
        if keep.any():
            masks = torch.from_numpy(r["masks"][keep]).repeat_interleave(k, 1).repeat_interleave(k, 2)
            big = draw_segmentation_masks(big, masks, alpha=0.45)
            names = [f"{dataset.class_names[int(c)]} {s:.2f}" for c, s in zip(r["labels"][keep], r["scores"][keep])]
            big = draw_bounding_boxes(big, torch.from_numpy(r["boxes"][keep] * k), labels=names, width=2,
                                      colors="yellow")
        panels.append(big.permute(1, 2, 0).numpy())
    side = max(max(p.shape[0] for p in panels), max(p.shape[1] for p in panels))
    panels = [np.pad(p, ((0, side - p.shape[0]), (0, side - p.shape[1]), (0, 0))) for p in panels]
    return save_image(image_grid(panels, ncol=min(count, 4), pad=4, pad_value=255), path)


def _print_metrics(metrics) -> None:
    for iou_type, m in metrics.items():
        print(f"COCO {iou_type} evaluation (pycocotools):\n{m['table']}")
    print(format_table(metrics), flush=True)


def _flat_metrics(metrics) -> Dict[str, float]:
    return {f"{t}_{name}": 100 * v for t, m in metrics.items() for name, v in m["stats"].items()}


# ---------------------------------------------------------------------------------------------- train
def _build_datasets(args, cfg: DetectionConfig):
    check_coco_layout(args.data_path)
    train_set = CocoInstances(args.data_path, "train", TrainTransform(cfg.img_scale, cfg.flip_ratio), train=True,
                              seed=args.seed)
    val_set = CocoInstances(args.data_path, "val", EvalTransform(cfg.img_scale), train=False,
                            classes_from=train_set.coco)
    if val_set.cat_ids != train_set.cat_ids:
        raise ValueError(f"{coco_paths(args.data_path, 'val')[0]} and {coco_paths(args.data_path, 'train')[0]} "
                         f"list different categories")
    return train_set, val_set


def _save(path, model, optimizer, scaler, iteration, epoch, cfg, dataset, args):
    state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "iteration": iteration,
             "epoch": epoch, "config": cfg.to_dict(), "rng_state": capture_rng_state(),
             "classes": {"cat_ids": list(dataset.cat_ids), "names": list(dataset.class_names)},
             "pretrained_weights": args.pretrained_weights, "checkpoint_key": args.checkpoint_key}
    atomic_save(state, path)


def train(args: argparse.Namespace) -> Dict[str, object]:
    """Train, evaluate during training and at the end; returns the final metrics (rank 0)."""
    device = _device(args)
    cfg = config_from_args(args)
    fix_random_seeds(args.seed + get_rank())
    print_run_header(args)
    print(describe(cfg, args.max_iters))
    os.makedirs(args.output_dir, exist_ok=True)
    train_set, val_set = _build_datasets(args, cfg)
    print(f"COCO data: {len(train_set)} training images (with annotations), {len(val_set)} validation images, "
          f"{train_set.num_classes} classes")

    model = build_detector(cfg, train_set.num_classes)
    report = model.backbone.load_pretrained(args.pretrained_weights, args.checkpoint_key)
    if report.get("random_init"):
        print("Backbone: RANDOM initialisation (--pretrained_weights '')")
    model.to(device)
    if args.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = layer_decay_param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp == "fp16" else None
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    world = get_world_size()
    sampler = EpochIndexSampler(len(train_set), shuffle=True, seed=args.seed, num_replicas=world, rank=get_rank())
    iters_per_epoch = math.ceil(len(sampler) / cfg.batch_size_per_gpu)
    total, steps = _schedule(cfg, iters_per_epoch, args.max_iters)
    save_every = args.save_every or iters_per_epoch
    eval_every = args.eval_every or iters_per_epoch
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    start = 0
    if args.auto_resume and os.path.isfile(ckpt_path):
        ckpt = safe_load(ckpt_path)
        _unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        restore_rng_state(ckpt["rng_state"])
        print(f"Resumed from {ckpt_path} at iteration {start}")
    print(f"{total} iterations ({iters_per_epoch} per epoch, {cfg.batch_size_per_gpu} images x {world} processes), "
          f"lr steps at {steps}, warm-up {cfg.warmup_iters}")

    writer = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tf_logs"))
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.2e}"))
    model.train()
    data_iter, it = None, start
    metrics = None          # set on rank 0 by every evaluation
    with StopOnSignal() as stop:
        for it in logger.log_every(range(start, total), args.print_freq, header="Train"):
            epoch, position = divmod(it, iters_per_epoch)
            if data_iter is None or position == 0:
                sampler.set_epoch(epoch, position * cfg.batch_size_per_gpu)
                data_iter = iter(_loader(train_set, sampler, cfg.batch_size_per_gpu, args.num_workers,
                                         torch.Generator().manual_seed(args.seed * 1000 + epoch)))
            images, targets, metas = next(data_iter)
            factor = lr_factor(it, steps, cfg.warmup_iters, cfg.warmup_ratio)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * g["lr_scale"] * factor
            with _autocast(device, cfg.amp):
                losses = model(images.to(device), [m["size"] for m in metas], _to_device(targets, device))
            loss = sum(v for k, v in losses.items() if "loss" in k)
            if not torch.isfinite(loss):
                parts = {k: float(v) for k, v in losses.items()}
                raise FloatingPointError(f"loss is {loss.item()} at iteration {it}: {parts}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            done = it + 1
            logger.update(loss=loss.item(), lr=cfg.lr * factor, **{k: v.item() for k, v in losses.items()})
            if writer is not None and (done % args.print_freq == 0 or done == total):
                for k, v in losses.items():
                    writer.add_scalar(f"train/{k}", v.item(), done)
                writer.add_scalar("train/loss", loss.item(), done)
                writer.add_scalar("train/lr", cfg.lr * factor, done)
            if is_main_process() and (done % save_every == 0 or done == total or stop.requested):
                _save(ckpt_path, model, optimizer, scaler, done, done // iters_per_epoch, cfg, train_set, args)
            if stop.requested:
                print(f"Stopped by {stop.signal_name} after iteration {done}; resume with --auto_resume true")
                return {}
            if done % eval_every == 0 or done == total:
                metrics = evaluate(model, val_set, device, cfg, args.num_workers)
                if is_main_process():
                    _print_metrics(metrics)
                    flat = _flat_metrics(metrics)
                    for k, v in flat.items():
                        if k.endswith(("_AP", "_AP50", "_AP75")):
                            writer.add_scalar(f"val/{k}", v, done)
                    record = {"iteration": done, "epoch": done / iters_per_epoch,
                              **{f"train_{k}": m.global_avg for k, m in logger.meters.items()}, **flat}
                    with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                        f.write(json.dumps(record) + "\n")
                model.train()
    if start >= total:  # resumed at the very end: evaluate the final checkpoint once more (all ranks)
        metrics = evaluate(model, val_set, device, cfg, args.num_workers)
    if is_main_process():
        if writer is not None:
            writer.close()
        _finish(args, cfg, model, val_set, device, metrics, "results.json", done_iters=total)
    return metrics or {}


def _finish(args, cfg, model, val_set, device, metrics, name, done_iters=None, title="Final checkpoint"):
    with open(os.path.join(args.output_dir, name), "w") as f:
        json.dump({"config": cfg.to_dict(), "iterations": done_iters,
                   "metrics": {t: m["stats"] for t, m in metrics.items()}}, f, indent=1)
    png = draw_predictions(model, val_set, device, cfg, os.path.join(args.output_dir, "predictions.png"),
                           args.num_vis)
    if png:
        print(f"Predictions drawn in {png}")
    print(f"{title}:")
    for iou_type in ("bbox", "segm"):
        print(f"{iou_type} AP: {100 * metrics[iou_type]['stats']['AP']:.2f}", flush=True)


# ---------------------------------------------------------------------------------------------- test
def test(args: argparse.Namespace) -> Dict[str, object]:
    """Evaluate ``args.checkpoint`` on the validation split; prints the AP table and
    ``bbox AP: x`` / ``segm AP: y`` (percent). Returns the metrics (rank 0)."""
    device = _device(args)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint file not found: {args.checkpoint}")
    ckpt = safe_load(args.checkpoint)
    for key in ("model", "config"):
        if key not in ckpt:
            raise KeyError(f"{args.checkpoint} is not a detection checkpoint of train.py (no '{key}' entry)")
    cfg = DetectionConfig.from_dict(ckpt["config"])
    if args.img_scale is not None:
        cfg.img_scale = args.img_scale
    if args.amp is not None:
        cfg.amp = args.amp
    print(describe(cfg))
    check_coco_layout(args.data_path, ("val",))
    val_set = CocoInstances(args.data_path, "val", EvalTransform(cfg.img_scale), train=False)
    saved = ckpt.get("classes", {}).get("cat_ids")
    if saved is not None and list(saved) != list(val_set.cat_ids):
        raise ValueError(f"{args.checkpoint} was trained on categories {saved}; "
                         f"{val_set.ann_file} lists {val_set.cat_ids}")
    model = build_detector(cfg, val_set.num_classes)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    start = time.time()
    metrics = evaluate(model, val_set, device, cfg, args.num_workers)
    if is_main_process():
        print(f"Evaluated {len(val_set)} images in {datetime.timedelta(seconds=int(time.time() - start))}")
        _print_metrics(metrics)
        os.makedirs(args.output_dir, exist_ok=True)
        _finish(args, cfg, model, val_set, device, metrics, "test_results.json", ckpt.get("iteration"),
                title=f"Checkpoint {args.checkpoint} (iteration {ckpt.get('iteration')})")
    return metrics or {}
