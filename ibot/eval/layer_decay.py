"""Layer-wise learning-rate decay of the fine-tuning recipes (spec ``evaluation.md`` §2.5 "Layer decay";
official ``optim_factory.py``): the layer id of a parameter, the parameter groups with their
``lr_scale`` and the optimiser built over them. ``evaluation/classification_layer_decay/optim_factory.py``
keeps the official names.
"""
import torch

from ibot.eval.weights import strip_key_prefixes

__all__ = ["get_layer_id_for_vit", "get_layer_id_for_swin", "LayerDecayValueAssigner", "param_groups_layer_decay",
           "create_layer_decay_optimizer"]


_WRAPPER_PREFIXES = ("module.", "backbone.")


def _strip_wrapper_prefix(name):
    return strip_key_prefixes(name, _WRAPPER_PREFIXES)


def get_layer_id_for_vit(name, num_layers):
    """Official (BEiT) layer id of a ViT parameter; ``num_layers`` is the number of blocks L.

    0: ``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.*``; b+1: ``blocks.b.*``;
    L+1: everything else (final norm, ``fc_norm``, head, shared ``rel_pos_bias``).
    A leading ``module.`` / ``backbone.`` (DDP / wrapper) is ignored.
    """
    name = _strip_wrapper_prefix(name)
    if name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers + 1
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def get_layer_id_for_swin(name, depths):
    """Official layer id of a Swin parameter (L = sum(depths)).

    0: tokens / position embeddings / ``patch_embed``; ``layers.s.blocks.j`` → sum(depths[:s]) + j + 1;
    ``layers.s.downsample`` counts as the stage's last block (sum(depths[:s+1])); else L+1.
    """
    name = _strip_wrapper_prefix(name)
    num_layers = sum(depths)
    if name in ("cls_token", "mask_token", "pos_embed", "absolute_pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        if parts[2] == "downsample":
            return sum(depths[:stage + 1])
    return num_layers + 1


class LayerDecayValueAssigner:
    """``values[i] = layer_decay ** (num_layers + 1 - i)`` for i = 0..L+1 (the head gets scale 1)."""

    def __init__(self, values, get_layer_id=None):
        self.values = list(values)
        self._get_layer_id = get_layer_id

    @classmethod
    def for_decay(cls, layer_decay, num_layers, get_layer_id=None):
        return cls([layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)], get_layer_id)

    def get_scale(self, layer_id):
        return self.values[layer_id]

    def get_layer_id(self, name):
        if self._get_layer_id is None:
            return get_layer_id_for_vit(name, len(self.values) - 2)
        return self._get_layer_id(name)


def _is_no_decay(name, param, skip_list):
    bare = _strip_wrapper_prefix(name)
    return param.ndim <= 1 or name.endswith(".bias") or name in skip_list or bare in skip_list


def param_groups_layer_decay(model, weight_decay=0.05, skip_list=(), layer_decay=None, num_layers=None,
                             get_layer_id=None):
    """Parameter groups of the official ``get_parameter_groups`` (BEiT ``optim_factory``).

    - no weight decay for 1-D parameters (norms, biases), names ending in ``.bias`` and names in
      ``skip_list`` (the model's ``no_weight_decay()``: ``pos_embed``, ``cls_token``);
    - with ``layer_decay`` (< 1 or not None), one group per (layer id, decay/no_decay), keyed
      ``layer_<id>_{decay|no_decay}`` and carrying ``lr_scale = layer_decay ** (L + 1 - id)``;
      without it, two groups (``decay`` / ``no_decay``) with ``lr_scale`` 1.

    Frozen parameters are skipped. Returns a list of dicts for ``torch.optim`` (each also holds
    ``group_name`` and ``param_names`` — extra keys are kept by torch optimisers).
    """
    skip_list = set(skip_list or ())
    assigner = None
    if layer_decay is not None:
        if get_layer_id is None:
            if num_layers is None:
                num_layers = len(getattr(model, "blocks", []))
            assigner = LayerDecayValueAssigner.for_decay(
                layer_decay, num_layers, lambda n: get_layer_id_for_vit(n, num_layers))
        else:
            if num_layers is None:
                raise ValueError("num_layers is required with a custom get_layer_id")
            assigner = LayerDecayValueAssigner.for_decay(layer_decay, num_layers, get_layer_id)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_no_decay(name, param, skip_list):
            kind, wd = "no_decay", 0.0
        else:
            kind, wd = "decay", weight_decay
        if assigner is not None:
            layer_id = assigner.get_layer_id(name)
            group_name = f"layer_{layer_id}_{kind}"
            scale = assigner.get_scale(layer_id)
        else:
            group_name, scale = kind, 1.0
        if group_name not in groups:
            groups[group_name] = {"group_name": group_name, "weight_decay": wd, "lr_scale": scale,
                                  "params": [], "param_names": []}
        groups[group_name]["params"].append(param)
        groups[group_name]["param_names"].append(name)
    return list(groups.values())


def create_layer_decay_optimizer(args, model, layer_decay=None, skip_list=None, num_layers=None,
                                  get_layer_id=None):
    """Optimiser of the BEiT recipe (official ``optim_factory.create_optimizer``) over
    :func:`param_groups_layer_decay` groups, built from ``args.opt``, ``args.lr``, ``args.weight_decay``,
    ``args.opt_eps``, ``args.opt_betas``, ``args.momentum``. ``skip_list`` defaults to ``model.no_weight_decay()``.

    Each group's ``lr`` is set to ``args.lr * lr_scale``; the per-step schedule overwrites it.
    """
    if skip_list is None:
        skip_list = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_layer_decay(model, weight_decay=args.weight_decay, skip_list=skip_list,
                                      layer_decay=layer_decay, num_layers=num_layers, get_layer_id=get_layer_id)
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
