"""The iBOT training step as an object that owns its networks (DINOv2's ``SSLMetaArch`` is the model).

:class:`iBOTTrainStep` holds the student, the teacher (with and without its DDP wrapper), the
:class:`~ibot.train.loss.iBOTLoss` (which owns the centres) and the student/teacher parameter pairs of
the EMA. One optimisation step is::

    losses, t_cls, s_cls = step.forward_backward(images, masks, epoch)   # loss.backward() included
    grad_norm = step.clip_and_step(optimizer, epoch)                     # clip, freeze last layer, step
    step.update_teacher(momentum)                                        # EMA: the online tokenizer

or all of it with the per-iteration schedules: ``step.train_step(optimizer, images, masks, it, epoch,
schedules)``. Two computations of the same loss and updates are chosen once, when the step is built
(tests hold them equal in fp32):

- :class:`FastComputation` (``--train_step fast``, default): the projection heads run on [CLS] tokens
  and masked patch tokens only; the teacher's patch logits are built only at masked positions and its
  centre statistic from the mean bottleneck feature; clipping and EMA use foreach kernels; nothing
  reads values back to the host.
- :class:`ReferenceComputation` (``reference``): the official computation (heads on every token,
  per-parameter ``.item()`` clipping, Python EMA loop, per-step gathers and synchronisation) — the
  baseline of ``benchmarks/train_step.py``.
"""
import dataclasses
import math
import sys

import torch

from ibot.models.wrapper import unmasked
from ibot.train.loss import KoLeoLoss, masked_token_weights
from ibot.train.optim import (cancel_gradients_last_layer, clip_gradients, clip_gradients_foreach, common_parameters,
                              ema_update, ema_update_loop)
from ibot.utils.distributed import unwrap
from ibot.utils.precision import autocast_context

__all__ = ["StepConfig", "FastComputation", "ReferenceComputation", "iBOTTrainStep", "NonFiniteLossError",
           "NonFiniteWatch", "forward_fast", "forward_reference", "add_koleo_term", "autocast_context", "unwrap"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss became NaN/Inf; the message names the step, the term and the schedules."""


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


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The flags one step reads: crops, clipping, last-layer freezing, KoLeo, the single student pass."""
    global_crops_number: int = 2
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    koleo_loss_weight: float = 0.0
    single_student_pass: bool = False

    @classmethod
    def from_args(cls, args):
        """The step configuration of parsed (and completed) ``main_ibot.py`` flags."""
        return cls(args.global_crops_number, args.clip_grad, args.freeze_last_layer, args.koleo_loss_weight,
                   getattr(args, "single_student_pass", False))


class FastComputation:
    """``--train_step fast``: heads on [CLS] and masked tokens, foreach clipping and EMA, no host sync."""
    name = "fast"
    gathers_every_step = False

    def forward(self, step, images, masks, epoch):
        c = step.config
        return forward_fast(step.student, step.teacher_without_ddp, step.ibot_loss, images, masks, epoch,
                            c.global_crops_number, step.device, c.single_student_pass, c.koleo_loss_weight)

    def check_loss(self, loss):
        """Nothing: the epoch loop's :class:`NonFiniteWatch` checks on the device."""

    def clip(self, step, clip):
        trainable = [p for p in unwrap(step.student).parameters() if p.requires_grad]
        norms = clip_gradients_foreach(trainable, clip)
        return norms.norm() if norms is not None else None

    def ema(self, pairs, momentum):
        ema_update(*pairs, momentum)

    def finish(self, device):
        """Nothing: no synchronisation."""


class ReferenceComputation(FastComputation):
    """``--train_step reference``: the official computation, step for step."""
    name = "reference"
    gathers_every_step = True

    def forward(self, step, images, masks, epoch):
        c = step.config
        return forward_reference(step.student, step.teacher, step.ibot_loss, images, masks, epoch,
                                 c.global_crops_number, step.device, c.koleo_loss_weight)

    def check_loss(self, loss):
        """Official: stop the process on a non-finite loss (read back every step)."""
        if not math.isfinite(loss.item()):
            print(f"Loss is {loss.item()}, stopping training", force=True)
            sys.exit(1)

    def clip(self, step, clip):
        clip_gradients(step.student, clip)
        return None

    def ema(self, pairs, momentum):
        ema_update_loop(*pairs, momentum)

    def finish(self, device):
        if device.type == "cuda":
            torch.cuda.synchronize()


COMPUTATIONS = {"fast": FastComputation, "reference": ReferenceComputation}


class iBOTTrainStep:
    """Student, teacher, loss and EMA pairs of one run, and the computation of one optimisation step.

    ``student`` / ``teacher``: the (possibly DDP-wrapped) ``MultiCropWrapper``s; ``teacher_without_ddp``
    the bare teacher; ``ibot_loss``: the loss with its centres; ``computation``: ``"fast"`` or
    ``"reference"``; ``precision``: ``fp32`` | ``fp16`` | ``bf16`` (fp16 needs ``fp16_scaler``).
    """

    def __init__(self, student, teacher, teacher_without_ddp, ibot_loss, *, config=StepConfig(),
                 computation="fast", device=torch.device("cpu"), precision="fp32", fp16_scaler=None):
        self.student, self.teacher, self.teacher_without_ddp = student, teacher, teacher_without_ddp
        self.ibot_loss, self.config = ibot_loss, config
        self.computation = COMPUTATIONS[computation]()
        self.device, self.precision, self.fp16_scaler = device, precision, fp16_scaler
        self.ema_pairs = common_parameters(unwrap(student), teacher_without_ddp)

    @classmethod
    def from_args(cls, student, teacher, teacher_without_ddp, ibot_loss, args, ctx, fp16_scaler=None):
        """The step of parsed flags ``args`` in run context ``ctx`` (device, precision, computation)."""
        return cls(student, teacher, teacher_without_ddp, ibot_loss, config=StepConfig.from_args(args),
                   computation=ctx.train_step, device=ctx.device, precision=ctx.precision,
                   fp16_scaler=fp16_scaler)

    @property
    def reference(self):
        """True when the official computation is in use."""
        return self.computation.name == "reference"

    def forward_backward(self, images, masks, epoch):
        """Loss of one batch and its backward pass (scaled under fp16); returns ``(losses, t_cls, s_cls)``.

        ``images``: list of ng+nl crop batches ``(B, 3, h, w)`` on the device; ``masks``: list of at
        least ng CPU bool tensors ``(B, H, W)``; ``losses``: ``loss``, ``cls``, ``patch`` (+ ``koleo``)
        0-d tensors; ``t_cls`` / ``s_cls``: ``(ng·B, K)`` [CLS] logits of teacher and student.
        """
        with autocast_context(self.device, self.precision):
            losses, t_cls, s_cls = self.computation.forward(self, images, masks, epoch)
        loss = losses["loss"]
        self.computation.check_loss(loss)
        if self.fp16_scaler is not None:
            self.fp16_scaler.scale(loss).backward()
        else:
            loss.backward()
        return losses, t_cls, s_cls

    def clip_and_step(self, optimizer, epoch):
        """Unscale (fp16), clip per parameter (``clip_grad``; 0 = off), cancel the last layer's gradients
        during ``freeze_last_layer`` epochs, step the optimizer. Returns the norm of the per-parameter
        gradient norms (fast computation with clipping) or None."""
        grad_norm = None
        clip = self.config.clip_grad
        if self.fp16_scaler is not None and clip:
            self.fp16_scaler.unscale_(optimizer)
        if clip:
            grad_norm = self.computation.clip(self, clip)
        cancel_gradients_last_layer(epoch, self.student, self.config.freeze_last_layer)
        if self.fp16_scaler is not None:
            self.fp16_scaler.step(optimizer)
            self.fp16_scaler.update()
        else:
            optimizer.step()
        return grad_norm

    def update_teacher(self, momentum):
        """EMA of the student into the teacher: ``t = m·t + (1 − m)·s`` over the shared parameters."""
        self.computation.ema(self.ema_pairs, momentum)
        self.computation.finish(self.device)

    def train_step(self, optimizer, images, masks, it, epoch, schedules):
        """One whole optimisation step at global iteration ``it`` with ``schedules = (lr, wd, momentum)``
        per-iteration arrays; returns ``(losses, t_cls, s_cls, grad_norm)``. Nothing is read back to the
        host in the fast computation."""
        lr_schedule, wd_schedule, momentum_schedule = schedules
        for j, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = float(lr_schedule[it])  # Python floats: numpy scalars would need unsafe unpickling
            if j == 0:
                param_group["weight_decay"] = float(wd_schedule[it])
        optimizer.zero_grad()
        losses, t_cls, s_cls = self.forward_backward(images, masks, epoch)
        grad_norm = self.clip_and_step(optimizer, epoch)
        self.update_teacher(float(momentum_schedule[it]))
        return losses, t_cls, s_cls, grad_norm
