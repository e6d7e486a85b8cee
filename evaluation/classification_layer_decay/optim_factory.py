"""Optimiser with layer-wise lr decay (official ``optim_factory.py``, spec §2.5 "Layer decay").

The layer-id rules and parameter grouping live in :mod:`ibot.eval.finetune` (shared by all fine-tuning
scripts); this module keeps the official entry points ``get_num_layer_for_vit``,
``get_num_layer_for_swin``, ``LayerDecayValueAssigner``, ``get_parameter_groups`` and
``create_optimizer``.

Deviation: ``adamw`` / ``adam`` / ``sgd`` / ``momentum`` are plain ``torch.optim`` optimisers;
any other ``--opt`` name is delegated to ``timm.optim.create_optimizer_v2`` (current timm API) with
our parameter groups. No DeepSpeed / apex fused optimisers.
"""
import torch

from ibot.eval.finetune import (LayerDecayValueAssigner, get_layer_id_for_swin, get_layer_id_for_vit,
                           param_groups_layer_decay)

__all__ = ["get_num_layer_for_vit", "get_num_layer_for_swin", "LayerDecayValueAssigner", "get_parameter_groups",
           "create_optimizer"]


def get_num_layer_for_vit(var_name, num_max_layer):
    """Official signature: ``num_max_layer`` = L + 2 (the number of lr scales)."""
    return get_layer_id_for_vit(var_name, num_max_layer - 2)


def get_num_layer_for_swin(var_name, num_max_layer, depths):
    return get_layer_id_for_swin(var_name, depths)


def get_parameter_groups(model, weight_decay=1e-5, skip_list=(), layer_decay=None, num_layers=None,
                         get_layer_id=None):
    """Groups ``layer_<id>_{decay|no_decay}`` with ``lr_scale`` (see ``ibot.finetune.param_groups_layer_decay``)."""
    return param_groups_layer_decay(model, weight_decay=weight_decay, skip_list=skip_list,
                                    layer_decay=layer_decay, num_layers=num_layers, get_layer_id=get_layer_id)


def create_optimizer(args, model, layer_decay=None, skip_list=None, num_layers=None, get_layer_id=None):
    """Build the optimiser from ``args.opt``, ``args.lr``, ``args.weight_decay``, ``args.opt_eps``,
    ``args.opt_betas``, ``args.momentum``. ``skip_list`` defaults to ``model.no_weight_decay()``.

    Each group's ``lr`` is set to ``args.lr * lr_scale``; the per-step schedule overwrites it.
    """
    if skip_list is None:
        skip_list = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = get_parameter_groups(model, args.weight_decay, skip_list, layer_decay, num_layers, get_layer_id)
    for g in groups:
        g["lr"] = args.lr * g["lr_scale"]
    opt = args.opt.lower()
    eps = getattr(args, "opt_eps", None) or 1e-8
    betas = tuple(args.opt_betas) if getattr(args, "opt_betas", None) else (0.9, 0.999)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, eps=eps, betas=betas, weight_decay=args.weight_decay)
    if opt == "adam":
        return torch.optim.Adam(groups, lr=args.lr, eps=eps, betas=betas, weight_decay=args.weight_decay)
    if opt in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=(opt != "momentum"),
                               weight_decay=args.weight_decay)
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(groups, opt=opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, eps=eps, betas=betas)
