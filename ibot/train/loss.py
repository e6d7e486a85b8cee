"""The iBOT objective: [CLS] self-distillation across views plus masked patch-token prediction.

``iBOTLoss`` owns its state (the two teacher centres and the per-epoch teacher temperatures), like
DINOv2's loss modules. Two entry points compute the same value:

- ``forward`` — the official signature and dense computation, with every patch token of every global
  crop: ``student_output = (s_cls (ng·B, K), s_patch (ng·B, Np, Kp))``.
- ``forward_masked`` — the fast path used by the trainer: the student's patch logits only at masked
  positions ``(M, Kp)`` with one weight per masked token, so that the patch term and its gradients
  equal the official per-image masked mean exactly (images without masked tokens count as 0 in the
  mean over the batch, quirk Q4).

Softmax, centring and the losses run in fp32 whatever the autocast precision.

``KoLeoLoss`` is DINOv2's regulariser, not part of iBOT; the trainer adds it only with
``--koleo_loss_weight`` > 0 (used by the small-image recipe, docs/small_image_recipe.md).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot.utils.distributed import all_reduce_sum, get_world_size

__all__ = ["teacher_temperature_schedules", "masked_token_weights", "iBOTLoss", "KoLeoLoss"]


def teacher_temperature_schedules(warmup_teacher_temp, teacher_temp, warmup_teacher_temp2, teacher_temp2,
                                  warmup_teacher_temp_epochs, nepochs, mim_start_epoch=0):
    """Per-epoch teacher temperatures ``(cls_schedule, patch_schedule)``, numpy arrays of length ``nepochs``.

    The patch schedule is held at its warm-up value for ``mim_start_epoch`` epochs, then warms up.
    Raises ``ValueError`` when ``nepochs < warmup_teacher_temp_epochs + mim_start_epoch``.
    """
    if nepochs < warmup_teacher_temp_epochs + mim_start_epoch:
        raise ValueError(
            f"--epochs ({nepochs}) must be at least --warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs})"
            f" + --pred_start_epoch ({mim_start_epoch})")
    cls_schedule = np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))
    patch_schedule = np.concatenate((
        np.ones(mim_start_epoch) * warmup_teacher_temp2,
        np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs - mim_start_epoch) * teacher_temp2))
    return cls_schedule, patch_schedule


def masked_token_weights(masks):
    """Index and weight of every masked patch token, computed where the masks live (the CPU).

    ``masks``: bool ``(N, H, W)`` or ``(N, Np)`` for the N = ng·B global-crop images, crop-major.
    Returns ``index`` (M,) int64 positions in the flattened ``(N·Np)`` token list (row-major, the
    token order of the backbone) and ``weight`` (M,) float32 = 1 / (masked tokens of its image).
    """
    flat = masks.flatten(1)
    counts = flat.sum(1)
    index = flat.reshape(-1).nonzero().squeeze(1)
    weight = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts)
    return index, weight


class iBOTLoss(nn.Module):
    """iBOT loss with the official constructor; buffers ``center (1, K)`` and ``center2 (1, 1, Kp)``.

    ``center2_tokens='all'`` is the official teacher patch centre (mean over all patch tokens of the
    global crops); ``'masked'`` centres on masked tokens only, as DINOv2 does (an explicit option).
    """

    def __init__(self, out_dim, patch_out_dim, ngcrops, nlcrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, center_momentum2=0.9, lambda1=1.0, lambda2=1.0,
                 mim_start_epoch=0, center2_tokens="all"):
        super().__init__()
        if ngcrops < 2:
            raise ValueError(f"iBOT needs at least 2 global crops (--global_crops_number), got {ngcrops}")
        if center2_tokens not in ("all", "masked"):
            raise ValueError(f"center2_tokens must be 'all' or 'masked', got {center2_tokens!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.ncrops = ngcrops + nlcrops
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.center2_tokens = center2_tokens
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.teacher_temp_schedule, self.teacher_temp2_schedule = teacher_temperature_schedules(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp2, teacher_temp2,
            warmup_teacher_temp_epochs, nepochs, mim_start_epoch)

    # ----------------------------------------------------------------------------------------------
    def _cls_term(self, student_cls, student_local_cls, teacher_cls, temp):
        """Mean over pairs (q teacher global crop, v student crop, q ≠ v) of the batch-mean cross-entropy."""
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        log_p_s = F.log_softmax(student_cls.float() / self.student_temp, dim=-1)
        p_t = F.softmax((teacher_cls.float() - self.center) / temp, dim=-1)
        n_s = log_p_s.shape[0] // self.ncrops if student_local_cls is not None else log_p_s.shape[0] // self.ngcrops
        log_p_s = log_p_s.reshape(-1, n_s, log_p_s.shape[-1])      # (crops, B, K)
        p_t = p_t.reshape(self.ngcrops, n_s, -1)                     # (ng, B, K)
        with torch.autocast(device_type=p_t.device.type, enabled=False):  # fp32 sums, as the official
            pair = -torch.einsum("qbk,vbk->qv", p_t, log_p_s) / n_s     # (ng, crops)
        same_view = torch.eye(self.ngcrops, pair.shape[1], dtype=torch.bool, device=pair.device)
        n_pairs = self.ngcrops * (pair.shape[1] - 1)
        return self.lambda1 * pair.masked_fill(same_view, 0).sum() / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch_mean, teacher_patch_masked=None):
        """EMA of the teacher centres from this step's raw teacher logits (all-reduced over ranks).

        ``teacher_cls (ng·B, K)``; ``teacher_patch_mean (ng·B, Kp)`` = each image's mean over its patch
        tokens; ``teacher_patch_masked (M, Kp)`` is used instead when ``center2_tokens == 'masked'``.
        """
        world = get_world_size()
        cls_sum = teacher_cls.float().sum(dim=0, keepdim=True)
        if self.center2_tokens == "masked":
            patch_sum = teacher_patch_masked.float().sum(dim=0, keepdim=True)
            stats = torch.cat([cls_sum, patch_sum.new_full((1, 1), teacher_patch_masked.shape[0])], dim=1)
            stats = all_reduce_sum(torch.cat([stats, patch_sum], dim=1))
            k = cls_sum.shape[1]
            cls_sum, count, patch_sum = stats[:, :k], stats[0, k], stats[:, k + 1:]
            patch_center = patch_sum / count.clamp(min=1)
        else:
            stats = all_reduce_sum(torch.cat([cls_sum, teacher_patch_mean.float().sum(dim=0, keepdim=True)], dim=1))
            k = cls_sum.shape[1]
            cls_sum, patch_center = stats[:, :k], stats[:, k:] / (len(teacher_patch_mean) * world)
        cls_center = cls_sum / (len(teacher_cls) * world)
        self.center.mul_(self.center_momentum).add_(cls_center, alpha=1 - self.center_momentum)
        self.center2.mul_(self.center_momentum2).add_(patch_center.unsqueeze(0), alpha=1 - self.center_momentum2)

    # ----------------------------------------------------------------------------------------------
    def forward(self, student_output, teacher_output, student_local_cls, student_mask, epoch):
        """Official dense computation; returns ``{'cls', 'patch', 'loss'}`` (0-d tensors) and updates the centres.

        ``student_output``/``teacher_output``: ``(cls (ng·B, K), patch (ng·B, Np, Kp))`` logits;
        ``student_local_cls``: ``(nl·B, K)`` or None; ``student_mask``: list of ≥ ng bool masks
        ``(B, H, W)`` with H·W = Np (only the first ng are read); ``epoch``: index into the
        temperature schedules.
        """
        s_cls, s_patch = student_output
        t_cls, t_patch = teacher_output
        temp, temp2 = self.teacher_temp_schedule[epoch], self.teacher_temp2_schedule[epoch]

        loss_cls = self._cls_term(s_cls, student_local_cls, t_cls, temp)

        log_p_s = F.log_softmax(s_patch.float() / self.student_temp, dim=-1)
        p_t = F.softmax((t_patch.float() - self.center2) / temp2, dim=-1)
        token_ce = -(p_t * log_p_s).sum(dim=-1)                                        # (ng·B, Np)
        mask = torch.cat([m.flatten(1) for m in student_mask[:self.ngcrops]]).to(token_ce)
        per_image = (token_ce * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        loss_patch = self.lambda2 * per_image.mean()   # = Σ_q mean_i(·) / ng, all crops have B images

        self.update_center(t_cls, t_patch.float().mean(1), t_patch[mask.bool()] if self.center2_tokens == "masked" else None)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)

    def forward_masked(self, student_cls, student_local_cls, student_patch_masked, teacher_cls,
                       teacher_patch_masked, teacher_patch_mean, token_weight, epoch):
        """Fast path: same value as ``forward`` from the logits of masked tokens only.

        ``student_cls (ng·B, K)``, ``student_local_cls (nl·B, K)`` or None, ``teacher_cls (ng·B, K)``;
        ``student_patch_masked``/``teacher_patch_masked (M, Kp)``: logits of the M masked tokens;
        ``teacher_patch_mean (ng·B, Kp)``: each image's mean teacher logit over ALL its patch tokens
        (the official centre statistic); ``token_weight (M,)`` from ``masked_token_weights``.
        """
        temp, temp2 = self.teacher_temp_schedule[epoch], self.teacher_temp2_schedule[epoch]
        loss_cls = self._cls_term(student_cls, student_local_cls, teacher_cls, temp)

        log_p_s = F.log_softmax(student_patch_masked.float() / self.student_temp, dim=-1)
        p_t = F.softmax((teacher_patch_masked.float() - self.center2[0]) / temp2, dim=-1)
        token_ce = -(p_t * log_p_s).sum(dim=-1)                                        # (M,)
        loss_patch = self.lambda2 * (token_ce * token_weight).sum() / teacher_cls.shape[0]

        self.update_center(teacher_cls, teacher_patch_mean, teacher_patch_masked)
        return dict(cls=loss_cls, patch=loss_patch, loss=loss_cls + loss_patch)


class KoLeoLoss(nn.Module):
    """Kozachenko–Leonenko entropy regulariser of DINOv2 (``dinov2/loss/koleo_loss.py``), not part of iBOT.

    ``forward(x (n, d)) -> scalar``: the mean over the n rows of ``-log`` of the Euclidean distance from
    each L2-normalised row to its nearest other row — low when the rows spread over the sphere. Runs in
    fp32; n >= 2. Used, when ``--koleo_loss_weight`` > 0, on the student's backbone [CLS] features of
    each global crop separately (per process, as in DINOv2).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # a row is never its own neighbour
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
        return -torch.log(distances + self.eps).mean()
