"""Shared pieces of the three fine-tuning scripts (spec ``evaluation.md`` §2.5, §2.6, §2.7).

Used by ``evaluation/classification_layer_decay/run_class_finetuning.py`` (BEiT recipe),
``evaluation/eval_cls.py`` (DeiT transfer recipe) and ``evaluation/semi_supervised/eval_cls.py``:

- layer ids, layer-wise lr decay parameter groups and the optimiser (``ibot.eval.layer_decay``,
  re-exported here);
- schedules: the per-step warm-up + cosine of the BEiT recipe (``ibot.train.schedules.cosine_scheduler``
  with ``warmup_steps``, re-exported here) and the per-epoch warm-up + cosine of timm's
  ``CosineLRScheduler`` used by the DeiT recipe (``epoch_cosine_value``);
- ``RASampler`` (DeiT "repeated augmentation");
- one training epoch (``train_one_epoch``) and one evaluation pass (``evaluate``), with native
  ``torch.autocast`` (``ibot.utils.precision.autocast_context`` with a bool) + ``torch.amp.GradScaler``
  instead of apex / DeepSpeed;
- checkpoint helpers built on ``ibot.utils.checkpoint.safe_load`` / ``atomic_save``.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from ibot.eval.layer_decay import (LayerDecayValueAssigner, create_layer_decay_optimizer, get_layer_id_for_swin,
                                   get_layer_id_for_vit, param_groups_layer_decay)
from ibot.train.schedules import cosine_scheduler
from ibot.utils import distributed as ibot_dist
from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.utils.metric_logger import MetricLogger, SmoothedValue
from ibot.utils.precision import autocast_context

__all__ = [
    "get_layer_id_for_vit", "get_layer_id_for_swin", "LayerDecayValueAssigner", "param_groups_layer_decay",
    "create_layer_decay_optimizer",
    "cosine_scheduler", "epoch_cosine_value", "RASampler", "GradScalerWithNorm", "train_one_epoch",
    "evaluate", "accuracy", "topk_accuracy", "save_json_log", "save_checkpoint", "load_checkpoint_for_resume",
]

# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------

def epoch_cosine_value(epoch, base_value, final_value, epochs, warmup_epochs=0, warmup_value=1e-6):
    """Value of timm's ``CosineLRScheduler`` (one cycle, ``t_initial=epochs``, no warm-up prefix) at
    ``epoch``: linear warm-up ``warmup_value + epoch * (base - warmup_value) / warmup_epochs`` for
    ``epoch < warmup_epochs``, then ``final + 0.5 (base - final)(1 + cos(pi * epoch / epochs))``;
    ``final_value`` from ``epochs`` on. This is the per-epoch schedule of the DeiT recipe (§2.6).
    """
    if epoch < warmup_epochs:
        return warmup_value + epoch * (base_value - warmup_value) / warmup_epochs
    if epoch >= epochs:
        return final_value
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * epoch / epochs))


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------

class RASampler(torch.utils.data.Sampler):
    """DeiT repeated-augmentation sampler: each epoch every index is repeated ``repeats`` times (3),
    the list is shuffled with seed ``epoch``, padded, split over ranks and truncated to
    ``floor(floor(len / 256) * 256 / world)`` samples per rank.

    [fix] For data sets of fewer than 256 images the reference truncation gives an empty epoch; we
    then keep ``ceil(len / world)`` samples per rank instead.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, repeats=3):
        self.dataset = dataset
        self.num_replicas = ibot_dist.get_world_size() if num_replicas is None else num_replicas
        self.rank = ibot_dist.get_rank() if rank is None else rank
        self.epoch = 0
        self.shuffle = shuffle
        self.repeats = repeats
        n = len(dataset)
        self.num_samples = int(math.ceil(n * repeats / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas
        self.num_selected_samples = int(math.floor(n // 256 * 256 / self.num_replicas))
        if self.num_selected_samples == 0:
            self.num_selected_samples = int(math.ceil(n / self.num_replicas))

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.epoch)
        n = len(self.dataset)
        indices = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        indices = [i for i in indices for _ in range(self.repeats)]
        indices += indices[: self.total_size - len(indices)]
        assert len(indices) == self.total_size
        indices = indices[self.rank:self.total_size:self.num_replicas]
        assert len(indices) == self.num_samples
        return iter(indices[: self.num_selected_samples])

    def __len__(self):
        return self.num_selected_samples

    def set_epoch(self, epoch):
        self.epoch = epoch


# ---------------------------------------------------------------------------------------------
# training / evaluation loops
# ---------------------------------------------------------------------------------------------

class GradScalerWithNorm:
    """Native replacement of the official ``NativeScalerWithGradNormCount`` (apex-free).

    ``__call__(loss, optimizer, clip_grad, parameters, update_grad)`` does backward on the scaled
    loss, and when ``update_grad`` unscales, clips (if ``clip_grad``), steps and updates the scale.
    Returns the gradient norm (before clipping) or None when no step was taken.
    """
    state_dict_key = "amp_scaler"

    def __init__(self, device="cuda", enabled=True):
        device_type = device.type if isinstance(device, torch.device) else str(device)
        self.enabled = bool(enabled) and device_type == "cuda"
        self._scaler = torch.amp.GradScaler(device_type if self.enabled else "cpu", enabled=self.enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None] if parameters is not None else []
        if clip_grad is not None and clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = _grad_norm(params)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if state_dict:
            self._scaler.load_state_dict(state_dict)

    def get_scale(self):
        return self._scaler.get_scale() if self.enabled else 1.0


def _grad_norm(params, norm_type=2.0):
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    device = params[0].grad.device
    return torch.norm(torch.stack([torch.norm(p.grad.detach(), norm_type).to(device) for p in params]),
                      norm_type)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=None,
                    model_ema=None, mixup_fn=None, lr_schedule_values=None, wd_schedule_values=None,
                    start_steps=0, num_training_steps_per_epoch=None, update_freq=1, use_amp=True,
                    print_freq=10):
    """One training epoch (official ``engine_for_finetuning.train_one_epoch``).

    With ``lr_schedule_values`` (per optimiser step), group lr = value × group ``lr_scale`` at every
    optimiser step ``start_steps + step // update_freq``; the weight-decay schedule is applied to the
    groups whose weight decay is > 0. Without schedules the groups' current lr is kept (DeiT recipe:
    set once per epoch by the caller). The loss is divided by ``update_freq`` (gradient
    accumulation). A non-finite loss stops the run, as in the reference.
    Returns the epoch averages (``loss``, ``lr``, ``min_lr``, ``weight_decay``, ``grad_norm``, ...).
    """
    model.train(True)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("min_lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for data_iter_step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        step = data_iter_step // update_freq
        if num_training_steps_per_epoch is not None and step >= num_training_steps_per_epoch:
            continue
        it = start_steps + step
        if data_iter_step % update_freq == 0 and (lr_schedule_values is not None or wd_schedule_values is not None):
            for group in optimizer.param_groups:
                if lr_schedule_values is not None:
                    group["lr"] = float(lr_schedule_values[min(it, len(lr_schedule_values) - 1)]) \
                        * group.get("lr_scale", 1.0)
                if wd_schedule_values is not None and group["weight_decay"] > 0:
                    group["weight_decay"] = float(wd_schedule_values[min(it, len(wd_schedule_values) - 1)])

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with autocast_context(device, use_amp):
            output = model(samples)
            loss = criterion(output, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            sys.stderr.write(f"Loss is {loss_value}, stopping training\n")
            sys.exit(1)

        update_grad = (data_iter_step + 1) % update_freq == 0
        grad_norm = loss_scaler(loss / update_freq, optimizer, clip_grad=max_norm, parameters=params,
                                update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)

        if device.type == "cuda":
            torch.cuda.synchronize()
        metric_logger.update(loss=loss_value)
        if mixup_fn is None and targets.ndim == 1:
            metric_logger.update(class_acc=(output.argmax(-1) == targets).float().mean().item())
        metric_logger.update(loss_scale=float(loss_scaler.get_scale()))
        lrs = [g["lr"] for g in optimizer.param_groups]
        metric_logger.update(lr=max(lrs), min_lr=min(lrs))
        wds = [g["weight_decay"] for g in optimizer.param_groups if g["weight_decay"] > 0]
        if wds:
            metric_logger.update(weight_decay=wds[0])
        if grad_norm is not None:
            metric_logger.update(grad_norm=float(grad_norm))

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def accuracy(output, target, topk=(1,)):
    """Official ``utils.accuracy``: top-k accuracies of logits (B, C) for targets (B,), in percent, as a
    list of 0-dim tensors. A k larger than C counts the top C (the official code fails there)."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.reshape(1, -1).expand_as(pred.t()))
    return [correct[:min(k, maxk)].reshape(-1).float().sum(0) * 100.0 / target.shape[0] for k in topk]


def topk_accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (list of floats) for integer targets (:func:`accuracy` as floats)."""
    return [a.item() for a in accuracy(output, target, topk)]


@torch.no_grad()
def evaluate(data_loader, model, device, use_amp=True, print_freq=10):
    """Cross-entropy, top-1 and top-5 (percent; top-5 = top-C when C < 5) on ``data_loader``.

    Averages are weighted by batch size and reduced over ranks.
    """
    criterion = nn.CrossEntropyLoss()
    metric_logger = MetricLogger(delimiter="  ")
    model.eval()
    for images, target in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast_context(device, use_amp):
            output = model(images)
            loss = criterion(output, target)
        acc1, acc5 = topk_accuracy(output.float(), target, topk=(1, 5))
        batch_size = images.shape[0]
        metric_logger.update(loss=loss.item())
        metric_logger.meters["acc1"].update(acc1, n=batch_size)
        metric_logger.meters["acc5"].update(acc5, n=batch_size)
    metric_logger.synchronize_between_processes()
    print("* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f}".format(
        top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


# ---------------------------------------------------------------------------------------------
# checkpoints and logs
# ---------------------------------------------------------------------------------------------

def save_json_log(output_dir, stats):
    """Append one JSON line to ``output_dir/log.txt`` (rank 0 only)."""
    if not output_dir or not ibot_dist.is_main_process():
        return
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")


def save_checkpoint(path, model_without_ddp, optimizer, epoch, loss_scaler, args, model_ema=None, **extra):
    """Atomic save of ``{model, optimizer, epoch, scaler, args[, model_ema], **extra}`` on rank 0."""
    if not ibot_dist.is_main_process():
        return
    obj = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(epoch),
           "scaler": loss_scaler.state_dict(), "args": args}
    if model_ema is not None:
        obj["model_ema"] = _ema_module(model_ema).state_dict()
    obj.update(extra)
    atomic_save(obj, path)


def _ema_module(model_ema):
    return getattr(model_ema, "module", model_ema)


def load_checkpoint_for_resume(path, model_without_ddp, optimizer=None, loss_scaler=None, model_ema=None):
    """Restore a checkpoint written by ``save_checkpoint`` (safe loading); returns the next epoch."""
    ckpt = safe_load(path)
    model_without_ddp.load_state_dict(ckpt["model"])
    print(f"Resume checkpoint {path}")
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if loss_scaler is not None and "scaler" in ckpt:
        loss_scaler.load_state_dict(ckpt["scaler"])
    if model_ema is not None and "model_ema" in ckpt:
        _ema_module(model_ema).load_state_dict(ckpt["model_ema"])
    return int(ckpt.get("epoch", -1)) + 1, ckpt


def barrier():
    if ibot_dist.is_dist_avail_and_initialized():
        dist.barrier()


def build_finetune_transform(is_train, args, mean, std, eval_size, eval_interpolation):
    """Fine-tuning transform of the BEiT and DeiT recipes: PIL image -> normalised (3, S, S) tensor.

    Training: timm's ``create_transform`` (colour jitter, ``args.aa`` RandAugment, RandomErasing with
    ``args.reprob/remode/recount``), its random-resized crop replaced by ``RandomCrop(S, padding=4)``
    for images of at most 32 px. Evaluation: above 32 px, ``Resize(eval_size(S), eval_interpolation)``
    then ``CenterCrop(S)``. ``S = args.input_size``; ``mean``/``std`` per channel.
    """
    from timm.data import create_transform
    from torchvision import transforms

    resize_im = args.input_size > 32
    if is_train:
        t = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa and args.aa.lower() != "none" else None,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std)
        if not resize_im:
            t.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return t
    t = []
    if resize_im:
        t.append(transforms.Resize(eval_size(args.input_size), interpolation=eval_interpolation))
        t.append(transforms.CenterCrop(args.input_size))
    t += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(t)
