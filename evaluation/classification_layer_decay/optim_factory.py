"""Optimiser with layer-wise lr decay (official ``optim_factory.py``, spec §2.5 "Layer decay").

The layer-id rules, parameter grouping and the optimiser live in :mod:`ibot.eval.layer_decay` (shared by
all fine-tuning scripts); this module keeps the official entry points ``get_num_layer_for_vit``,
``get_num_layer_for_swin``, ``LayerDecayValueAssigner``, ``get_parameter_groups`` and
``create_optimizer``.

Deviation: ``adamw`` / ``adam`` / ``sgd`` / ``momentum`` are plain ``torch.optim`` optimisers;
any other ``--opt`` name is delegated to ``timm.optim.create_optimizer_v2`` (current timm API) with
our parameter groups. No DeepSpeed / apex fused optimisers.
"""
from ibot.eval.layer_decay import (LayerDecayValueAssigner, create_layer_decay_optimizer, get_layer_id_for_swin,
                                   get_layer_id_for_vit, param_groups_layer_decay)

__all__ = ["get_num_layer_for_vit", "get_num_layer_for_swin", "LayerDecayValueAssigner", "get_parameter_groups",
           "create_optimizer"]


def get_num_layer_for_vit(var_name, num_max_layer):
    """Official signature: ``num_max_layer`` = L + 2 (the number of lr scales)."""
    return get_layer_id_for_vit(var_name, num_max_layer - 2)


def get_num_layer_for_swin(var_name, num_max_layer, depths):
    return get_layer_id_for_swin(var_name, depths)


def get_parameter_groups(model, weight_decay=1e-5, skip_list=(), layer_decay=None, num_layers=None,
                         get_layer_id=None):
    """Groups ``layer_<id>_{decay|no_decay}`` with ``lr_scale`` (see ``ibot.eval.layer_decay.param_groups_layer_decay``)."""
    return param_groups_layer_decay(model, weight_decay=weight_decay, skip_list=skip_list,
                                    layer_decay=layer_decay, num_layers=num_layers, get_layer_id=get_layer_id)


def create_optimizer(args, model, layer_decay=None, skip_list=None, num_layers=None, get_layer_id=None):
    """Official signature of :func:`ibot.eval.layer_decay.create_layer_decay_optimizer`."""
    return create_layer_decay_optimizer(args, model, layer_decay, skip_list, num_layers, get_layer_id)
