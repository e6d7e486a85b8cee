"""Optimisation pieces: parameter groups, LARS, per-parameter gradient clipping, last-layer freezing
and the EMA teacher update.

Each has the official behaviour; the ``*_foreach`` variants compute the same on the device with
``torch._foreach_*`` kernels and no host synchronisation.
"""
import torch
import torch.nn as nn


def get_params_groups(model):
    """Official groups: ``[{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]``.

    Biases and 1-D tensors are not regularised; every other trainable tensor is (``cls_token``,
    ``pos_embed``, ``masked_embed`` and a trainable weight-norm gain included, quirk Q3). Frozen
    parameters are left out. The order is ``named_parameters()`` order (optimizer state is positional).
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """Official LARS: for non-1-D params, weight decay then trust ratio ``eta·‖p‖/‖g‖``; momentum ``mu``."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(name, param_groups, device_type="cpu"):
    """``adamw`` (library defaults; fused on CUDA, foreach elsewhere), ``sgd`` (momentum 0.9) or ``lars``."""
    if name == "adamw":
        fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(param_groups, **fast)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(param_groups)
    raise ValueError(f"unknown --optimizer {name!r} (choose adamw, sgd or lars)")


def clip_gradients(model, clip):
    """Official per-parameter clipping: scale each grad by ``clip/(‖g‖+1e-6)`` when that is < 1.

    Returns the list of per-parameter norms as Python floats (one host sync each, as the official).
    """
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


@torch.no_grad()
def clip_gradients_foreach(params, clip):
    """Same clipping as ``clip_gradients`` for an iterable of parameters, on the device, no host sync.

    Returns the per-parameter norms as one tensor (before clipping), or None if no parameter has a grad.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).float()
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Drop the grads of every parameter whose name contains ``last_layer`` while ``epoch < freeze_last_layer``."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def common_parameters(student, teacher):
    """Aligned ``(student_params, teacher_params)`` lists over the parameter names both modules have.

    Each list follows its own module's registration order filtered to the common names (official
    EMA pairing); names only the student has (``masked_embed``, an unshared ``last_layer2``) are skipped.
    """
    s_named = dict(student.named_parameters())
    t_named = dict(teacher.named_parameters())
    names = [n for n in s_named if n in t_named]
    return [s_named[n] for n in names], [t_named[n] for n in names]


@torch.no_grad()
def ema_update(student_params, teacher_params, momentum):
    """θ_t ← m·θ_t + (1−m)·θ_s over aligned parameter lists, with foreach kernels (no Python loop)."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


@torch.no_grad()
def ema_update_loop(student_params, teacher_params, momentum):
    """The official per-parameter Python loop (kept for the reference step and the benchmark)."""
    for param_q, param_k in zip(student_params, teacher_params):
        param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)


def has_batchnorms(model):
    """True if any module is a BatchNorm (1d/2d/3d/Sync)."""
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())
