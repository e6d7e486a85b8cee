"""One iBOT training epoch: forward of teacher and student, loss, backward, clipping, step, EMA.

Two implementations of the step compute the same loss and updates (tests hold them equal in fp32):

- ``fast`` (default): the projection heads run on [CLS] tokens and masked patch tokens only; the
  teacher's patch logits are built only at masked positions and its centre statistic from the mean
  bottleneck feature; clipping and EMA use foreach kernels; nothing reads values back to the host
  except every ``--print_freq`` iterations.
- ``reference``: the official computation (heads on every token, per-parameter ``.item()`` clipping,
  Python EMA loop, per-step gathers and synchronisation) — the baseline of ``benchmarks/train_step.py``.
"""
import contextlib
import math
import sys

import torch

from ibot.eval.cluster_metrics import eval_pred
from ibot.utils.distributed import concat_all_gather
from ibot.train.loss import KoLeoLoss, masked_token_weights
from ibot.utils.metric_logger import MetricLogger
from ibot.train.optim import (cancel_gradients_last_layer, clip_gradients, clip_gradients_foreach, common_parameters,
                    ema_update, ema_update_loop)
from ibot.models.wrapper import unmasked


class NonFiniteLossError(RuntimeError):
    """Raised when the loss became NaN/Inf; the message names the step, the term and the schedules."""


def unwrap(model):
    """The module inside a DDP (or compile) wrapper, or the model itself."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast_context(device, precision):
    """``torch.autocast`` for ``precision`` in {fp32, fp16, bf16} on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _local_crops_context(student):
    """Official: the student's local crops are never masked (the backbone's flag is off meanwhile)."""
    return unmasked(unwrap(student).backbone)


_KOLEO = KoLeoLoss()


def add_koleo_term(losses, student_cls_feat, ngcrops, weight):
    """Add ``weight`` × Σ over global crops of the KoLeo term of the student's backbone [CLS] features
    ``(ng·B, D)`` to ``losses["loss"]`` and report it as ``losses["koleo"]`` (DINOv2; off when 0)."""
    term = sum(_KOLEO(chunk) for chunk in student_cls_feat.chunk(ngcrops))
    losses["koleo"] = term.detach()
    losses["loss"] = losses["loss"] + weight * term
    return losses


def forward_fast(student, teacher_without_ddp, ibot_loss, images, masks, epoch, ngcrops, device, single_pass=False,
                 koleo_weight=0.0):
    """Fast forward + loss. ``images``: list of crop batches on ``device``; ``masks``: list of at least
    ``ngcrops`` CPU bool tensors ``(B, H, W)``. Returns ``(loss dict, teacher cls (ng·B, K), student cls)``.

    ``single_pass``: one student call over global and local crops (one head pass over every [CLS]
    and masked token) instead of two; same values. ``koleo_weight`` > 0 adds the KoLeo term.
    """
    global_masks = torch.cat(list(masks[:ngcrops]))
    index, weight = masked_token_weights(global_masks)
    index, weight = index.to(device, non_blocking=True), weight.to(device, non_blocking=True)
    device_masks = [m.to(device, non_blocking=True) for m in masks[:ngcrops]]

    # with --center2_tokens masked the teacher head runs on [CLS] and masked tokens only
    t_cls, t_patch_masked, t_patch_mean = teacher_without_ddp.teacher_outputs(
        images[:ngcrops], index, patch_mean=ibot_loss.center2_tokens == "all")
    s_local_cls, koleo = None, koleo_weight > 0
    if single_pass and len(images) > ngcrops:
        s_cls, s_patch_masked, *feat = student(images, mask=device_masks, masked_index=index, return_cls_feat=koleo)
        s_cls, s_local_cls = s_cls[:t_cls.shape[0]], s_cls[t_cls.shape[0]:]
        feat = [f[:t_cls.shape[0]] for f in feat]
    else:
        s_cls, s_patch_masked, *feat = student(images[:ngcrops], mask=device_masks, masked_index=index,
                                               return_cls_feat=koleo)
        if len(images) > ngcrops:
            with _local_crops_context(student):
                s_local_cls = student(images[ngcrops:], cls_only=True)
    losses = ibot_loss.forward_masked(s_cls, s_local_cls, s_patch_masked, t_cls, t_patch_masked,
                                      t_patch_mean, weight, epoch)
    if koleo:
        add_koleo_term(losses, feat[0], ngcrops, koleo_weight)
    return losses, t_cls, s_cls


def forward_reference(student, teacher, ibot_loss, images, masks, epoch, ngcrops, device, koleo_weight=0.0):
    """Official forward + loss (heads on every token). Same inputs and outputs as ``forward_fast``."""
    device_masks = [m.to(device, non_blocking=True) for m in masks]
    teacher_output = teacher(images[:ngcrops])
    koleo = koleo_weight > 0
    student_output = student(images[:ngcrops], mask=device_masks[:ngcrops], return_backbone_feat=koleo)
    if koleo:
        backbone_out, student_output = student_output
    s_local_cls = None
    if len(images) > ngcrops:
        with _local_crops_context(student):
            s_local_cls = student(images[ngcrops:])[0]
    losses = ibot_loss(student_output, teacher_output, s_local_cls, device_masks, epoch)
    if koleo:
        add_koleo_term(losses, backbone_out[:, 0], ngcrops, koleo_weight)
    return losses, teacher_output[0], student_output[0]


class NonFiniteWatch:
    """Remembers, on the device, the first iteration whose loss was not finite (no host sync per step)."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(3, device=device)  # cls, patch, gradient norm at that step

    def update(self, it, losses, grad_norm):
        bad = ~torch.isfinite(losses["loss"].detach())
        newly = bad & (self.first_bad < 0)
        self.first_bad = torch.where(newly, torch.full_like(self.first_bad, it), self.first_bad)
        grad_norm = grad_norm if grad_norm is not None else torch.full((), float("nan"), device=self.values.device)
        current = torch.stack([losses["cls"].detach().float(), losses["patch"].detach().float(), grad_norm.float()])
        self.values = torch.where(newly, current, self.values)

    def check(self, epoch, lr_schedule, ibot_loss):
        it = int(self.first_bad.item())
        if it < 0:
            return
        cls, patch, grad = self.values.tolist()
        terms = [name for name, v in (("cls", cls), ("patch", patch)) if not math.isfinite(v)] or ["loss"]
        raise NonFiniteLossError(
            f"non-finite loss at global step {it} (epoch {epoch}): term {' and '.join(terms)} "
            f"(cls={cls}, patch={patch}); lr={lr_schedule[it]:.3g}, teacher temperatures "
            f"cls={ibot_loss.teacher_temp_schedule[epoch]:.4g} patch={ibot_loss.teacher_temp2_schedule[epoch]:.4g}, "
            f"gradient norm={grad:.4g}. Training stopped; the last checkpoint saved before this step is intact.")


def train_step(student, teacher, teacher_without_ddp, ibot_loss, optimizer, images, masks, it, epoch,
               lr_schedule, wd_schedule, momentum_schedule, fp16_scaler, ema_pairs, args):
    """One optimisation step on a batch; returns ``(losses, t_cls, s_cls, grad_norm)``.

    ``images``: list of ng+nl crop batches ``(B, 3, h, w)`` already on the device; ``masks``: list of
    at least ng CPU bool tensors ``(B, H, W)``; ``it``: global iteration (schedule index);
    ``ema_pairs``: ``common_parameters(student, teacher)``. ``grad_norm`` is the norm of the
    per-parameter gradient norms (fast path with clipping) or None; nothing is read back to the host
    in the fast path.
    """
    device, precision = args.device, args.precision
    koleo_weight = getattr(args, "koleo_loss_weight", 0.0)
    reference = args.train_step == "reference"
    ngcrops = args.global_crops_number
    for j, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = float(lr_schedule[it])  # Python floats: numpy scalars would need unsafe unpickling
        if j == 0:
            param_group["weight_decay"] = float(wd_schedule[it])

    with autocast_context(device, precision):
        if reference:
            losses, t_cls, s_cls = forward_reference(student, teacher, ibot_loss, images, masks, epoch, ngcrops, device,
                                                     koleo_weight)
        else:
            losses, t_cls, s_cls = forward_fast(student, teacher_without_ddp, ibot_loss, images, masks, epoch,
                                                ngcrops, device, getattr(args, "single_student_pass", False),
                                                koleo_weight)
    loss = losses["loss"]
    if reference and not math.isfinite(loss.item()):
        print(f"Loss is {loss.item()}, stopping training", force=True)
        sys.exit(1)

    optimizer.zero_grad()
    grad_norm = None
    if fp16_scaler is not None:
        fp16_scaler.scale(loss).backward()
        if args.clip_grad:
            fp16_scaler.unscale_(optimizer)
    else:
        loss.backward()
    if args.clip_grad:
        if reference:
            clip_gradients(student, args.clip_grad)
        else:
            trainable = [p for p in unwrap(student).parameters() if p.requires_grad]
            norms = clip_gradients_foreach(trainable, args.clip_grad)
            grad_norm = norms.norm() if norms is not None else None
    cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
    if fp16_scaler is not None:
        fp16_scaler.step(optimizer)
        fp16_scaler.update()
    else:
        optimizer.step()

    momentum = float(momentum_schedule[it])
    (ema_update_loop if reference else ema_update)(*ema_pairs, momentum)
    if reference and device.type == "cuda":
        torch.cuda.synchronize()
    return losses, t_cls, s_cls, grad_norm


def train_one_epoch(student, teacher, teacher_without_ddp, ibot_loss, data_loader, optimizer, lr_schedule,
                    wd_schedule, momentum_schedule, epoch, fp16_scaler, args):
    """Official signature. Trains one epoch and returns the averaged stats ``{loss, cls, patch, lr, wd,
    acc}`` plus the clustering monitors ``nmi, ari, fscore, adjacc`` when the data set has labels.
    """
    args.device = getattr(args, "device", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if getattr(args, "precision", None) is None:
        args.precision = "fp16" if fp16_scaler is not None else "fp32"
    args.train_step = getattr(args, "train_step", "fast")
    reference = args.train_step == "reference"
    print_freq = getattr(args, "print_freq", 10)

    metric_logger = MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    ema_pairs = common_parameters(unwrap(student), teacher_without_ddp)
    watch = NonFiniteWatch(args.device)
    pred_labels, real_labels = [], []

    # a mid-epoch resume (ibot.faults.StepBoundaryLoader) yields the epoch's batches from start_iter on
    start_iter = getattr(data_loader, "start_iter", 0)
    for i, (images, labels, masks) in enumerate(metric_logger.log_every(data_loader, print_freq, header),
                                                start=start_iter):
        it = len(data_loader) * epoch + i
        images = [im.to(args.device, non_blocking=True) for im in images]
        losses, t_cls, s_cls, grad_norm = train_step(
            student, teacher, teacher_without_ddp, ibot_loss, optimizer, images, masks, it, epoch,
            lr_schedule, wd_schedule, momentum_schedule, fp16_scaler, ema_pairs, args)

        # monitor: agreement of teacher (crop 0) and student (crop 1) argmax, official (quirk Q26)
        batch = labels.shape[0]
        pred1 = t_cls[:batch].argmax(dim=-1)
        pred2 = s_cls[batch:2 * batch].argmax(dim=-1)
        if reference:  # official: gather every step
            pred1, pred2 = concat_all_gather(pred1), concat_all_gather(pred2)
            real_labels.append(concat_all_gather(labels.to(args.device)))
        else:
            real_labels.append(labels)
        pred_labels.append(pred1)

        if not reference:
            watch.update(it, losses, grad_norm)
        metric_logger.update(loss=losses["loss"].detach())
        metric_logger.update(cls=losses["cls"].detach(), patch=losses["patch"].detach())
        if "koleo" in losses:
            metric_logger.update(koleo=losses["koleo"])
        metric_logger.update(lr=optimizer.param_groups[0]["lr"], wd=optimizer.param_groups[0]["weight_decay"])
        metric_logger.update(acc=(pred1 == pred2).float().mean())
        if not reference and (i % print_freq == 0 or i == len(data_loader) - 1):
            watch.check(epoch, lr_schedule, ibot_loss)

    stats = _epoch_monitors(pred_labels, real_labels, reference, getattr(args, "has_labels", True))
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return_dict = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    return_dict.update(stats)
    return return_dict


def _epoch_monitors(pred_labels, real_labels, gathered, has_labels):
    """NMI/ARI/F of the teacher's crop-0 argmax against the folder labels, over the whole epoch."""
    if not pred_labels or not has_labels:
        return {}
    pred = torch.cat(pred_labels)
    real = torch.cat([r.to(pred.device) for r in real_labels])
    if not gathered:
        pred, real = concat_all_gather(pred), concat_all_gather(real)
    pred, real = pred.cpu().numpy(), real.cpu().numpy()
    nmi, ari, fscore, adjacc = eval_pred(real, pred, calc_acc=False)
    print(f"NMI: {nmi}, ARI: {ari}, F: {fscore}, ACC: {adjacc}")
    return {"nmi": nmi, "ari": ari, "fscore": fscore, "adjacc": adjacc}
