"""Backbone extraction from pre-training checkpoints (pretraining.md §8) and conversion to timm.

* :func:`extract_backbone` — the official rule of ``extract_backbone_weights.py``: keys beginning
  with ``backbone.`` / ``module.backbone.`` lose that prefix; other keys are kept unchanged only with
  ``with_head``.
* :func:`timm_config` / :func:`to_timm_state_dict` / :func:`create_timm_model` — a state dict that
  ``timm.create_model(<name>, pretrained=False, **kwargs)`` loads with ``strict=True``, for every
  ViT the repository builds (any patch size, image size, depth, width): ``<name>`` is a registered
  timm name and ``kwargs`` (``img_size``, ``patch_size``, ``num_classes=0``, and the size keywords
  where they differ from the named model) rebuild the architecture. The timm model's ``forward``
  (final-norm [CLS] token, or fc-norm patch mean for mean-pooling builds) then equals our ViT's
  ``forward``. The iBOT ViT uses timm's parameter names, so the conversion only drops
  ``masked_embed`` and projection-head keys and renames LayerScale ``gamma_1/2`` to ``ls1/2.gamma``,
  then checks every key against the timm model. Only ViTs are supported (Swin raises an error).
"""
import math
import re


from ibot.utils.checkpoint import safe_load
from ibot.eval.weights import select_state_dict, strip_prefixes

__all__ = ["ExportError", "extract_backbone", "load_entry", "timm_config", "to_timm_state_dict",
           "create_timm_model", "export_timm"]



class ExportError(RuntimeError):
    """The checkpoint cannot be exported as requested."""


def load_entry(path, checkpoint_key):
    """Load ``path`` safely and return ``(checkpoint, entry)`` where ``entry = checkpoint[checkpoint_key]``.

    Raises ``ExportError`` listing the top-level keys when ``checkpoint_key`` is absent.
    """
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise ExportError(f"{path} holds a {type(ckpt).__name__}, not a dict")
    if checkpoint_key not in ckpt:
        raise ExportError(f"checkpoint_key {checkpoint_key!r} not found in {path}; keys present: "
                          f"{list(ckpt.keys())[:30]}")
    entry = ckpt[checkpoint_key]
    if not isinstance(entry, dict):
        raise ExportError(f"{path}[{checkpoint_key!r}] is a {type(entry).__name__}, not a state dict")
    return ckpt, entry


def extract_backbone(state_dict, with_head=False):
    """Official backbone extraction.

    Args:
        state_dict: ``dict[str, Tensor]`` such as ``checkpoint['teacher']`` or ``['student']``.
        with_head: keep the non-backbone entries with their keys unchanged.
    Returns:
        (out, n_backbone): the new ``dict[str, Tensor]`` and the number of backbone keys in it.
    """
    out, n = {}, 0
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            out[key[len("backbone."):]] = value
            n += 1
        elif key.startswith("module.backbone."):
            out[key[len("module.backbone."):]] = value
            n += 1
        elif with_head:
            out[key] = value
    return out, n


def _vit_backbone(state_dict):
    """Bare ViT backbone keys of any accepted state dict (full-checkpoint entry or backbone file)."""
    sd = strip_prefixes(state_dict, ("module.", "_orig_mod."))
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if not sd:
        raise ExportError("no backbone keys found in the state dict")
    if any(k.startswith("layers.") for k in sd):
        raise ExportError("Swin checkpoints cannot be exported to timm by this tool (ViT only)")
    for k in ("pos_embed", "cls_token", "patch_embed.proj.weight"):
        if k not in sd:
            raise ExportError(f"not an iBOT ViT backbone: key {k!r} missing (keys: {sorted(sd)[:10]}...)")
    return sd


# timm's standard ViT sizes: (width, heads) -> (size name, depth). timm's constructor defaults are
# ViT-Base's, so non-standard widths are built from ``vit_base_patch16_224`` with every size kwarg.
_TIMM_SIZES = {(192, 3): ("tiny", 12), (384, 6): ("small", 12), (768, 12): ("base", 12),
               (1024, 16): ("large", 24)}
_GENERIC = "vit_base_patch16_224"


def _timm_name(size, patch):
    """A registered timm name for ``size`` and ``patch``: ``vit_<size>_patch<p>_224`` where timm has it
    (e.g. ``vit_small_patch8_224``), else ``vit_<size>_patch16_224`` (kwargs then set the patch size)."""
    import timm
    name = f"vit_{size}_patch{patch}_224"
    return name if timm.is_model(name) else f"vit_{size}_patch16_224"


def timm_config(state_dict, args=None, num_heads=None):
    """timm model name and constructor kwargs that rebuild a ViT backbone state dict.

    Args:
        state_dict: backbone or full-checkpoint entry (prefixes are handled).
        args: optional ``argparse.Namespace`` of the run; not used for the decision (shapes decide,
            stored args need not describe the weights), kept for callers that pass it.
        num_heads: attention heads (shapes cannot tell them); default: width / 64, the head width of
            every official ViT size.
    Returns:
        dict ``{"model_name": str, "kwargs": dict}`` such that ``timm.create_model(model_name,
        pretrained=False, **kwargs)`` builds the matching model for any patch size, image size and
        depth. ``model_name`` is always a registered timm name (``vit_tiny_patch16_224`` for a
        ViT-Tiny of any patch size, ``vit_small_patch8_224`` where timm has the exact patch size,
        ``vit_base_patch16_224`` for non-standard widths); ``kwargs`` always hold ``img_size``,
        ``patch_size`` and ``num_classes=0``, plus the size kwargs (``embed_dim``, ``depth``,
        ``num_heads``, ``mlp_ratio``, ``qkv_bias``) where they differ from the named model, and
        ``init_values`` (LayerScale) / ``global_pool="avg", fc_norm=True`` (mean pooling) when the
        weights have them.
    """
    sd = _vit_backbone(state_dict)
    dim = sd["pos_embed"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_patches = sd["pos_embed"].shape[1] - 1
    side = int(round(math.sqrt(n_patches)))
    if side * side != n_patches:
        raise ExportError(f"pos_embed with {n_patches} patch positions is not a square grid")
    img = side * patch
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in sd) if m)
    heads = num_heads or (dim // 64 if dim % 64 == 0 else None)
    if heads is None:
        raise ExportError(f"cannot infer the number of attention heads of a ViT of width {dim} "
                          f"(not a multiple of 64); pass num_heads (--num_heads) explicitly")
    if dim % heads:
        raise ExportError(f"width {dim} is not divisible by num_heads={heads}")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    qkv_bias = "blocks.0.attn.qkv.bias" in sd
    kwargs = dict(img_size=img, patch_size=patch, num_classes=0)
    standard = _TIMM_SIZES.get((dim, heads))
    if standard:
        name = _timm_name(standard[0], patch)
        if depth != standard[1]:
            kwargs["depth"] = depth
    else:
        name = _GENERIC
        kwargs.update(embed_dim=dim, depth=depth, num_heads=heads)
    if mlp_ratio != 4 or not standard:
        kwargs["mlp_ratio"] = mlp_ratio
    if not qkv_bias or not standard:
        kwargs["qkv_bias"] = qkv_bias
    if "blocks.0.gamma_1" in sd:
        kwargs["init_values"] = 1.0  # LayerScale present; the loaded gammas replace this value
    if "fc_norm.weight" in sd:
        kwargs.update(global_pool="avg", fc_norm=True)
    return {"model_name": name, "kwargs": kwargs}


def create_timm_model(config):
    """Build the (random-init, never downloaded) timm model of a :func:`timm_config` result.

    Also accepts the ``"VisionTransformer"`` name written by earlier versions of the exporter.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer
    if config["model_name"] == "VisionTransformer":
        return VisionTransformer(**config["kwargs"])
    return timm.create_model(config["model_name"], pretrained=False, **config["kwargs"])


def _timm_key(key):
    """Our parameter name -> timm's (identical except LayerScale ``gamma_1/2`` -> ``ls1/2.gamma``)."""
    return re.sub(r"^(blocks\.\d+\.)gamma_([12])$", r"\1ls\2.gamma", key)


def to_timm_state_dict(state_dict, config=None):
    """Convert a ViT backbone / checkpoint entry to a state dict that the timm model loads strictly.

    Args:
        state_dict: ``dict[str, Tensor]`` (full-checkpoint entry or backbone file; prefixes handled).
        config: :func:`timm_config` result (computed when None).
    Returns:
        (timm_state_dict, config). Raises ``ExportError`` naming missing/unexpected keys or shape
        mismatches against the timm model.
    """
    sd = _vit_backbone(state_dict)
    config = config or timm_config(sd)
    sd = {_timm_key(k): v for k, v in sd.items() if k != "masked_embed"}
    ref = create_timm_model(config).state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    mismatched = [f"{k} {tuple(v.shape)} vs timm {tuple(ref[k].shape)}" for k, v in sd.items()
                  if k in ref and v.shape != ref[k].shape]
    if missing or unexpected or mismatched:
        raise ExportError(f"cannot map the backbone onto timm {config['model_name']} {config['kwargs']}: "
                          f"missing {missing}, unexpected {unexpected}, mismatched {mismatched}")
    return {k: sd[k].clone() for k in ref}, config


def export_timm(path, checkpoint_key="teacher", num_heads=None):
    """Load a checkpoint file and return ``(timm_state_dict, config)`` for its ``checkpoint_key`` entry.

    ``checkpoint_key`` may also name a backbone-file wrapper (``state_dict``) or be None for a flat
    file. ``num_heads``: see :func:`timm_config`.
    """
    ckpt = safe_load(path)
    sd, _ = select_state_dict(ckpt, checkpoint_key, source=str(path))
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return to_timm_state_dict(sd, timm_config(sd, args, num_heads))
