"""AdamW parameter groups of the dense configs (official ``LayerDecayOptimizerConstructor``, evaluation.md §2.12).

The segmentation and detection configs build AdamW through one constructor, applied to the whole
segmentor / detector whose ViT sits under the attribute ``backbone``. With ``L`` transformer blocks
(the config's ``num_layers``) it uses ``L + 2`` layer ids:

* id 0: ``backbone.cls_token``, ``backbone.mask_token``, ``backbone.pos_embed``, ``backbone.patch_embed.*``;
* id b+1: ``backbone.blocks.b.*``;
* id L+1: everything else (decode / auxiliary heads, necks, the backbone pyramid ``fpn*``, ``backbone.norm``);
* ``lr_scale = rate ** (L + 1 - id)`` and the group's ``lr = lr_scale * base_lr``;
* weight decay 0 for 1-D parameters and names ending in ``.bias``; the official test also lists
  ``pos_embed`` / ``cls_token``, but compares these bare names with prefixed ones, so both ARE
  decayed (quirk kept by default; ``exempt_pos_embed=True`` applies the intended exemption).

Groups are keyed ``layer_<id>_{decay|no_decay}`` in first-seen order, as the official constructor
builds them. Layer ids come from :func:`ibot.eval.layer_decay.get_layer_id_for_vit` (the same rule as
fine-tuning), applied to the names under the backbone prefix.
"""
from ibot.eval.layer_decay import get_layer_id_for_vit

__all__ = ["dense_layer_id", "layer_decay_param_groups", "plain_param_groups"]

_DDP_PREFIX = "module."


def dense_layer_id(name, num_blocks, backbone_prefix="backbone."):
    """Layer id (0..num_blocks+1) of parameter ``name`` of a dense model (see the module docstring).

    A leading ``module.`` (DDP) is ignored; names outside ``backbone_prefix`` get ``num_blocks + 1``.
    """
    if name.startswith(_DDP_PREFIX):
        name = name[len(_DDP_PREFIX):]
    if not name.startswith(backbone_prefix):
        return num_blocks + 1
    return get_layer_id_for_vit(name[len(backbone_prefix):], num_blocks)


def layer_decay_param_groups(model, base_lr, weight_decay=0.05, layer_decay_rate=0.9, num_blocks=None,
                             backbone_prefix="backbone.", exempt_pos_embed=False):
    """Official layer-decay parameter groups for ``torch.optim.AdamW(groups, betas=(0.9, 0.999))``.

    Args:
        model: the dense model (``named_parameters`` like ``backbone.blocks.0.attn.qkv.weight``).
        base_lr: the config's ``optimizer.lr``.
        weight_decay: ``optimizer.weight_decay`` for the decayed groups.
        layer_decay_rate: ``paramwise_cfg.layer_decay_rate`` (1.0: every scale 1).
        num_blocks: ``paramwise_cfg.num_layers`` (default: ``len(model.backbone.blocks)``).
        backbone_prefix: prefix of the backbone's parameter names.
        exempt_pos_embed: also exempt ``pos_embed`` / ``cls_token`` from weight decay (the official
            intent; False reproduces the official behaviour).
    Returns:
        list of dicts with ``params``, ``param_names``, ``group_name``, ``lr``, ``lr_scale``,
        ``weight_decay``; frozen parameters (``requires_grad=False``) are left out.
    """
    if num_blocks is None:
        backbone = getattr(model, backbone_prefix.rstrip("."), None)
        if backbone is None or not hasattr(backbone, "blocks"):
            raise ValueError(f"num_blocks not given and the model has no '{backbone_prefix}blocks' to count")
        num_blocks = len(backbone.blocks)
    num_ids = num_blocks + 2
    exempt = {backbone_prefix + "pos_embed", backbone_prefix + "cls_token"} if exempt_pos_embed else set()
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = name[len(_DDP_PREFIX):] if name.startswith(_DDP_PREFIX) else name
        if param.ndim == 1 or name.endswith(".bias") or bare in exempt:
            kind, decay = "no_decay", 0.0
        else:
            kind, decay = "decay", weight_decay
        layer_id = dense_layer_id(name, num_blocks, backbone_prefix)
        group_name = f"layer_{layer_id}_{kind}"
        if group_name not in groups:
            scale = layer_decay_rate ** (num_ids - layer_id - 1)
            groups[group_name] = {"group_name": group_name, "weight_decay": decay, "lr_scale": scale,
                                  "lr": scale * base_lr, "params": [], "param_names": []}
        groups[group_name]["params"].append(param)
        groups[group_name]["param_names"].append(name)
    return list(groups.values())


def plain_param_groups(model, base_lr, weight_decay=0.05):
    """One AdamW group of every trainable parameter, all weight-decayed (the linear configs).

    The linear configs use mmcv's default constructor without ``paramwise_cfg``: a single group in
    which biases are decayed too. Returns ``[{'params', 'param_names', 'group_name': 'all', 'lr',
    'lr_scale': 1.0, 'weight_decay'}]``.
    """
    names, params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name)
            params.append(param)
    return [{"group_name": "all", "weight_decay": weight_decay, "lr_scale": 1.0, "lr": base_lr,
             "params": params, "param_names": names}]
