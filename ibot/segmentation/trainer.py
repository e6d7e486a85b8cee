"""Iteration-based ADE20K training and testing (the mmseg ``IterBasedRunner`` loop of the official configs).

:func:`resolve_preset` turns a preset name and command-line overrides into the run's settings;
:func:`train` builds the segmentor, loads the backbone weights, trains with AdamW + poly schedule
(+ linear warm-up), writes ``iter_<N>.pth`` / ``latest.pth`` every ``checkpoint_interval``
iterations, evaluates every ``eval_interval`` and at the end, and returns the final metrics;
:func:`evaluate` computes mIoU over a split (sharded over ranks, areas summed).

Outputs in ``output_dir``: checkpoints (``meta``, ``state_dict``, ``optimizer``, ``scaler``, ``rng``),
``log.txt`` (one JSON line per evaluation), ``tf_logs/`` (TensorBoard scalars), and
``predictions_iter<N>.png`` (a few validation images: image | ground truth | prediction).
Resume (``auto_resume`` or ``resume_from``) restores the weights, optimiser, scaler, RNG and
iteration; the sampler and augmentation depend only on the sample position, so a resumed run ends
with the weights of an uninterrupted one.
"""
import dataclasses
import datetime
import json
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from ibot.dense.layer_decay import layer_decay_param_groups, plain_param_groups
from ibot.utils import distributed as ibot_dist
from ibot.utils.checkpoint import atomic_save, safe_load

from .dataset import ADE20KDataset, IterationSampler
from .metrics import IoUAccumulator
from .presets import get_preset, scaled_to_crop
from .schedule import set_lr
from .segmentor import build_segmentor, predict
from .transforms import TrainPipeline
from .visualize import save_prediction_panel

__all__ = ["resolve_preset", "build_model", "evaluate", "train", "load_segmentor_checkpoint",
           "format_metrics"]

_OVERRIDES = ("max_iters", "batch_size_per_gpu", "num_classes", "lr", "layer_decay_rate", "warmup_iters",
              "checkpoint_interval", "eval_interval", "out_with_norm", "drop_path_rate")


def resolve_preset(args):
    """The preset of ``args.preset`` with the command-line overrides applied.

    ``args.arch`` / ``args.patch_size`` replace the backbone (UperNet channels follow its width);
    ``args.crop_size`` rescales the pipeline (:func:`scaled_to_crop`) and must be a multiple of the
    patch size; the attributes named in ``_OVERRIDES`` replace the preset's values when not None.
    """
    preset = get_preset(args.preset)
    changes = {}
    if getattr(args, "arch", None) and args.arch != preset.arch:
        changes["arch"] = args.arch
        changes["channels"] = 0  # D of the new backbone (4 D for the linear head)
    if getattr(args, "patch_size", None):
        changes["patch_size"] = args.patch_size
    for name in _OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    preset = dataclasses.replace(preset, **changes) if changes else preset
    crop = getattr(args, "crop_size", None)
    if crop:
        preset = scaled_to_crop(preset, crop)
    if preset.crop_size % preset.patch_size:
        raise ValueError(f"--crop_size {preset.crop_size} is not a multiple of the patch size {preset.patch_size}")
    if preset.max_iters <= 0:
        raise ValueError(f"--max_iters must be positive, got {preset.max_iters}")
    return preset


def build_model(preset, pretrained_weights="", checkpoint_key="teacher", use_checkpoint=False):
    """Segmentor of ``preset`` with the backbone loaded from ``pretrained_weights`` (``''``: random init).

    Raises ``PretrainedWeightsError`` (listing keys) when the file does not fit the architecture.
    """
    model = build_segmentor(preset, use_checkpoint=use_checkpoint)
    model.backbone.load_pretrained(pretrained_weights or "", checkpoint_key)
    return model


def _autocast(device, amp):
    if amp == "off":
        return None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def format_metrics(metrics, class_names=None):
    """Lines printed after an evaluation: per-class IoU / Acc, then ``mIoU: X`` (percent)."""
    names = class_names or [str(i) for i in range(len(metrics["IoU"]))]
    lines = ["per-class IoU / Acc:"]
    lines += [f"  {n:>16s}  IoU {iou:6.2f}  Acc {acc:6.2f}" for n, iou, acc in zip(names, metrics["IoU"], metrics["Acc"])]
    lines.append(f"aAcc: {metrics['aAcc']:.2f}  mAcc: {metrics['mAcc']:.2f}")
    lines.append(f"mIoU: {metrics['mIoU']:.2f}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(model, dataset, preset, device, amp="off", mode="slide", num_panel=0, panel_path=None):
    """mIoU of ``model`` over ``dataset`` (test split), images sharded over ranks, areas summed.

    Returns the metric dict of :meth:`IoUAccumulator.summary`; with ``num_panel`` > 0 rank 0 writes
    the first images' PNG panel to ``panel_path``.
    """
    was_training = model.training
    model.eval()
    rank, world = ibot_dist.get_rank(), ibot_dist.get_world_size()
    acc = IoUAccumulator(dataset.num_classes)
    panel = []
    autocast = _autocast(device, amp)
    start = time.time()
    indices = list(range(rank, len(dataset), world))
    for k, index in enumerate(indices):
        img, label, _ = dataset[index]
        pred = predict(model, img, preset, device, mode=mode, autocast=autocast).cpu()
        acc.update(pred, torch.from_numpy(label.astype("int64")))
        if rank == 0 and len(panel) < num_panel:
            panel.append((img, label, pred.numpy()))
        if rank == 0 and (k + 1) % 50 == 0:
            eta = (time.time() - start) / (k + 1) * (len(indices) - k - 1)
            print(f"Test [{k + 1}/{len(indices)}] eta: {datetime.timedelta(seconds=int(eta))}", flush=True)
    acc.all_reduce(device if device.type == "cuda" else "cpu")
    if panel and panel_path:
        save_prediction_panel(panel_path, panel, acc.num_classes)
    model.train(was_training)
    return acc.summary()


def _checkpoint_state(model, optimizer, scaler, iteration, preset, args):
    state = {"meta": {"iter": iteration, "preset": dataclasses.asdict(preset),
                      "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}},
             "state_dict": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "rng": {"torch": torch.get_rng_state()}}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _link_latest(output_dir, name):
    link = os.path.join(output_dir, "latest.pth")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)


def load_segmentor_checkpoint(model, path):
    """Load a segmentor checkpoint (``state_dict`` of :func:`train`, or a released mmseg file) into ``model``.

    Returns the loaded dict. Raises ``RuntimeError`` listing missing / unexpected keys.
    """
    ckpt = safe_load(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    result = _unwrap(model).load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"segmentor checkpoint {path} does not fit the model: missing "
                           f"{result.missing_keys[:20]}, unexpected {result.unexpected_keys[:20]}")
    return ckpt


def _progress(iteration, max_iters, start_iter, started, meters, lr):
    done = iteration + 1 - start_iter
    per_iter = (time.time() - started) / max(done, 1)
    eta = datetime.timedelta(seconds=int(per_iter * (max_iters - iteration - 1)))
    items = "  ".join(f"{k}: {v:.4f}" for k, v in meters.items())
    return f"Iter [{iteration + 1}/{max_iters}]  eta: {eta}  lr: {lr:.3e}  {items}  time: {per_iter:.3f} s/it"


def train(args, preset=None, stop_iter=None):
    """Train a segmentor as the preset says; returns the final evaluation's metric dict.

    ``args``: namespace with ``preset`` and overrides (see :func:`resolve_preset`),
    ``pretrained_weights``, ``checkpoint_key``, ``data_path``, ``output_dir``, ``device``, ``amp``,
    ``auto_resume``, ``resume_from``, ``num_workers``, ``seed``, ``print_freq``, ``use_checkpoint``,
    ``num_panel``, ``check_labels``. ``stop_iter`` ends the run after that many iterations, having
    written a checkpoint there (an interruption, for resume tests).
    """
    preset = preset or resolve_preset(args)
    device = args.device
    os.makedirs(args.output_dir, exist_ok=True)
    train_set = ADE20KDataset(args.data_path, "train", preset.num_classes, preset.reduce_zero_label,
                              TrainPipeline(preset.crop_size, preset.train_scale, preset.ratio_range,
                                            preset.cat_max_ratio, preset.flip_prob))
    val_set = ADE20KDataset(args.data_path, "val", preset.num_classes, preset.reduce_zero_label)
    limit = getattr(args, "check_labels", None)
    for ds in (train_set, val_set):
        ds.check_labels(None if limit is None or limit < 0 else limit)

    model = build_model(preset, args.pretrained_weights, args.checkpoint_key,
                        getattr(args, "use_checkpoint", False)).to(device)
    if preset.layer_decay_rate is None:
        groups = plain_param_groups(model, preset.lr, preset.weight_decay)
    else:
        groups = layer_decay_param_groups(model, preset.lr, preset.weight_decay, preset.layer_decay_rate)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                                  lr=preset.lr, betas=preset.betas, weight_decay=preset.weight_decay)
    amp = args.amp
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" and device.type == "cuda" else None

    start_iter = 0
    resume = getattr(args, "resume_from", None)
    latest = os.path.join(args.output_dir, "latest.pth")
    if not resume and getattr(args, "auto_resume", False) and os.path.exists(latest):
        resume = latest
    if resume:
        ckpt = load_segmentor_checkpoint(model, resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_iter = int(ckpt["meta"]["iter"])
        print(f"Resumed from {resume} at iteration {start_iter}", flush=True)

    world = ibot_dist.get_world_size()
    if world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    sampler = IterationSampler(len(train_set), preset.batch_size_per_gpu, preset.max_iters, start_iter,
                               seed=args.seed, rank=ibot_dist.get_rank(), world_size=world)
    loader = torch.utils.data.DataLoader(train_set, batch_size=preset.batch_size_per_gpu, sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         drop_last=True, generator=torch.Generator(),
                                         persistent_workers=False)
    writer = None
    if ibot_dist.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tf_logs"))
    autocast = _autocast(device, amp)
    last_iter = preset.max_iters if stop_iter is None else min(stop_iter, preset.max_iters)
    print(f"Training {preset.name} ({preset.head}, {preset.arch}/{preset.patch_size}, crop {preset.crop_size}) "
          f"from iteration {start_iter} to {last_iter} of {preset.max_iters}", flush=True)
    model.train()
    started = time.time()
    meters = {}
    metrics = None
    iteration = start_iter
    for iteration, (images, labels) in zip(range(start_iter, last_iter), loader):
        lr = set_lr(optimizer, iteration, preset.max_iters, preset.poly_power, preset.min_lr,
                    preset.warmup_iters, preset.warmup_ratio)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast() if autocast else nullcontext():
            losses = model(images, labels)
        loss = losses["loss"] / preset.update_interval
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}; stopping")
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (iteration + 1) % preset.update_interval == 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        meters = {k: float(v.detach()) for k, v in losses.items()}
        done = iteration + 1
        if writer is not None:
            for k, v in meters.items():
                writer.add_scalar(f"train/{k}", v, done)
            writer.add_scalar("train/lr", lr, done)
        if done % args.print_freq == 0 or done == last_iter:
            print(_progress(iteration, preset.max_iters, start_iter, started, meters, lr), flush=True)
        final = done == preset.max_iters
        if done % preset.checkpoint_interval == 0 or final or done == last_iter:
            if ibot_dist.is_main_process():
                name = f"iter_{done}.pth"
                atomic_save(_checkpoint_state(model, optimizer, scaler, done, preset, args),
                            os.path.join(args.output_dir, name))
                _link_latest(args.output_dir, name)
        if done % preset.eval_interval == 0 or final:
            metrics = evaluate(_unwrap(model), val_set, preset, device, amp, num_panel=getattr(args, "num_panel", 4),
                               panel_path=os.path.join(args.output_dir, f"predictions_iter{done}.png"))
            _log_eval(args.output_dir, writer, done, metrics, meters)
            if ibot_dist.is_main_process():
                print(format_metrics(metrics), flush=True)
    if writer is not None:
        writer.close()
    return metrics


def _log_eval(output_dir, writer, iteration, metrics, meters):
    if not ibot_dist.is_main_process():
        return
    record = {"iter": iteration, **{f"train_{k}": v for k, v in meters.items()},
              **{k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc")}}
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
    if writer is not None:
        for k in ("mIoU", "mAcc", "aAcc"):
            writer.add_scalar(f"val/{k}", metrics[k], iteration)
