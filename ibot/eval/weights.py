"""Loading pretrained backbone weights for evaluation (evaluation.md §1.3, pretraining.md §10.2).

``load_pretrained_weights(model, pretrained_weights, checkpoint_key, model_name, patch_size)`` keeps
the official signature but is strict where the official helper was silent:

* files are read with :func:`ibot.checkpoint.safe_load` (``weights_only=True``; a file that would need
  to unpickle arbitrary objects is refused and never executed);
* the state dict is found inside full pre-training checkpoints (``teacher`` / ``student``) and
  backbone files (flat, or under ``state_dict`` / ``model`` / ``module``), auto-detected;
* ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``) and ``backbone.`` are removed only at the
  START of keys (the official code used ``str.replace`` anywhere in the key);
* projection-head entries (``head.*`` / non-backbone entries of a full checkpoint) are dropped,
  ``masked_embed`` (students only) is dropped when the model has none, and a model built without it
  keeps its own value when the file has none;
* the position embedding is resized (bicubic) when the checkpoint's patch grid differs from the
  model's;
* any other missing / unexpected backbone key or shape mismatch raises
  :class:`PretrainedWeightsError` listing them (``allow_partial=True`` loads what matches and logs
  everything that was skipped at WARNING level);
* an empty ``pretrained_weights`` keeps the random initialisation and logs a WARNING (logger
  ``ibot.eval.weights``) — no silent fallback for a path that does not exist, which is an error.

The ``download`` / ``supervised`` keywords of the official code fetch weights from the internet; this
implementation never downloads, so they raise an error asking for a local file.
"""
import logging
import math
import os

import torch
import torch.nn.functional as F

from ibot.utils.checkpoint import safe_load
from ibot.utils.distributed import unwrap

logger = logging.getLogger("ibot.eval.weights")

__all__ = ["PretrainedWeightsError", "load_pretrained_weights", "select_state_dict", "state_dict_by_model_key",
           "strip_key_prefixes", "strip_prefixes", "backbone_state_dict", "resize_pos_embed", "WRAPPER_KEYS"]

# keys under which a state dict may sit inside a checkpoint file, in auto-detection order
WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "student")
_GENERIC_WRAPPERS = ("state_dict", "model", "module")
_LEADING_PREFIXES = ("module.", "_orig_mod.")


class PretrainedWeightsError(RuntimeError):
    """The checkpoint does not fit the model (or holds no usable state dict)."""


def _is_state_dict(d):
    """True when ``d`` is a non-empty mapping of names to tensors (a state dict)."""
    return isinstance(d, dict) and len(d) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in d.items())


def _describe_keys(d, limit=20):
    keys = list(d.keys()) if isinstance(d, dict) else []
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


def select_state_dict(checkpoint, checkpoint_key=None, source="checkpoint"):
    """Find the state dict inside a loaded checkpoint.

    Args:
        checkpoint: object returned by ``safe_load`` (a dict).
        checkpoint_key: ``'teacher'``, ``'student'``, ``'state_dict'``... or None (auto-detect).
            When the key is absent, a generic wrapper (``state_dict``/``model``/``module``) or a flat
            state dict is accepted in its place (a backbone file given with ``--checkpoint_key
            teacher``); ``teacher``/``student`` are never substituted for one another.
        source: name used in messages (usually the file path).
    Returns:
        (state_dict, where): ``dict[str, Tensor]`` and a human-readable description of its location.
    Raises:
        PretrainedWeightsError naming the keys present when no state dict can be found.
    """
    if not isinstance(checkpoint, dict):
        raise PretrainedWeightsError(f"{source} holds a {type(checkpoint).__name__}, not a dict of weights")
    path = []
    node = checkpoint
    substituted = False
    if checkpoint_key:
        if checkpoint_key in node:
            node = node[checkpoint_key]
            path.append(checkpoint_key)
        elif _is_state_dict(node):
            logger.info("%s: no %r entry; the file is a flat state dict, using it", source, checkpoint_key)
        elif any(k in node for k in _GENERIC_WRAPPERS):
            substituted = True
            logger.info("%s: no %r entry; using the backbone-file wrapper found instead", source, checkpoint_key)
        else:
            raise PretrainedWeightsError(
                f"checkpoint_key {checkpoint_key!r} not found in {source}; keys present: "
                f"{_describe_keys(node)}")
    # descend through wrappers (e.g. {'state_dict': {...}} or {'model': {'module': ...}})
    for _ in range(4):
        if _is_state_dict(node):
            break
        if not isinstance(node, dict):
            raise PretrainedWeightsError(f"{source}[{']['.join(path)}] is a {type(node).__name__}, not a state dict")
        candidates = [k for k in (_GENERIC_WRAPPERS if (path or substituted) else WRAPPER_KEYS) if k in node]
        if not candidates:
            raise PretrainedWeightsError(
                f"no state dict found in {source}" + (f"[{']['.join(path)}]" if path else "")
                + f"; keys present: {_describe_keys(node)}. Pass --checkpoint_key with one of them.")
        if not checkpoint_key and not path and "teacher" in node and "student" in node:
            key = "teacher"
        else:
            key = candidates[0]
        logger.info("%s: using the state dict under %r", source, key)
        node = node[key]
        path.append(key)
    if not _is_state_dict(node):
        raise PretrainedWeightsError(f"no state dict found in {source}; keys present: {_describe_keys(checkpoint)}")
    return node, ("[" + "][".join(repr(p) for p in path) + "]") if path else "(top level)"


def state_dict_by_model_key(checkpoint, keys):
    """The official fine-tuning rule (``--model_key 'model|module'``): the first of ``keys`` whose entry
    at the top level of ``checkpoint`` (a dict) is a dict, else the whole checkpoint. Unlike
    :func:`select_state_dict` it neither descends into wrappers nor raises for a missing key.

    Returns ``(state_dict, key_used_or_None)``.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a dict checkpoint, got {type(checkpoint).__name__}")
    for key in keys:
        if key and key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key], key
    return checkpoint, None


def strip_key_prefixes(key, prefixes):
    """``key`` without the ``prefixes`` at its START, removed repeatedly and in any order (empty prefixes
    are ignored): ``'module.backbone.blocks.0.module.x'`` -> ``'blocks.0.module.x'``."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if p and key.startswith(p):
                key = key[len(p):]
                changed = True
    return key


def strip_prefixes(state_dict, prefixes=("module.", "_orig_mod.", "backbone.")):
    """Remove wrapper prefixes from the START of every key (repeatedly, in any order).

    Args:
        state_dict: ``dict[str, Tensor]``.
        prefixes: prefixes to remove when a key begins with them.
    Returns:
        new dict with the same tensors; ``'blocks.0.module.x'`` keeps its inner ``module.``.
    """
    out = {}
    for key, value in state_dict.items():
        new = strip_key_prefixes(key, prefixes)
        if new in out:
            raise PretrainedWeightsError(f"two checkpoint keys map to {new!r} after removing prefixes")
        out[new] = value
    return out


def backbone_state_dict(state_dict):
    """Keep the backbone part of a (possibly wrapped) state dict, with prefixes removed.

    Args:
        state_dict: ``dict[str, Tensor]`` from a full checkpoint entry (``module.backbone.*``,
            ``backbone.*``, ``head.*``...) or a backbone file (bare keys, maybe ``head.*``).
    Returns:
        (backbone, dropped): the backbone ``dict[str, Tensor]`` with bare keys, and the list of
        original keys that were dropped as non-backbone (projection head) entries.
    """
    sd = strip_prefixes(state_dict, _LEADING_PREFIXES)
    has_backbone_prefix = any(k.startswith("backbone.") for k in sd)
    backbone, dropped = {}, []
    for key, value in sd.items():
        if has_backbone_prefix:
            if key.startswith("backbone."):
                backbone[key[len("backbone."):]] = value
            else:
                dropped.append(key)
        elif key.startswith("head."):
            dropped.append(key)
        else:
            backbone[key] = value
    return backbone, dropped


def resize_pos_embed(pos_embed, new_num_patches, num_extra_tokens=1, new_grid=None):
    """Resize a ViT position embedding to a new patch grid (bicubic).

    Args:
        pos_embed: (1, num_extra_tokens + N_old, D) with N_old a perfect square.
        new_num_patches: N_new (a perfect square unless ``new_grid`` is given).
        num_extra_tokens: leading tokens kept as they are (1 for the [CLS] token).
        new_grid: optional (h, w) target grid with h * w = N_new (non-square dense backbones).
    Returns:
        (1, num_extra_tokens + N_new, D) tensor of the same dtype.
    """
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:]
    old = int(round(math.sqrt(grid.shape[1])))
    if new_grid is None:
        new = int(round(math.sqrt(new_num_patches)))
        new_grid = (new, new)
    new_grid = tuple(int(g) for g in new_grid)
    if old * old != grid.shape[1] or new_grid[0] * new_grid[1] != new_num_patches:
        raise PretrainedWeightsError(
            f"cannot resize pos_embed: {grid.shape[1]} -> {new_num_patches} patches is not square to "
            f"a {new_grid[0]}x{new_grid[1]} grid")
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


def _is_benign_missing(key, model_sd, ckpt_sd):
    """Model keys that may legitimately be absent from a backbone checkpoint."""
    if key == "masked_embed":  # teachers and eval files have none; unused without a mask
        return True
    if key.endswith("relative_position_index") or key.endswith("attn_mask"):  # Swin buffers, deterministic
        return True
    if key.startswith("fc_norm.") and "norm.weight" not in model_sd:  # mean-pooling model (avgpool 1)
        return True
    return False


def load_pretrained_weights(model, pretrained_weights, checkpoint_key="teacher", model_name=None,
                            patch_size=None, allow_partial=False):
    """Load backbone weights from a checkpoint file into ``model`` (in place).

    Args:
        model: backbone ``nn.Module`` (ViT or Swin; a DDP wrapper is unwrapped).
        pretrained_weights: path to a full pre-training checkpoint or a backbone file; ``''``/None
            keeps the random initialisation (logged as a WARNING).
        checkpoint_key: entry to use (``teacher``, ``student``, ``state_dict``...) or None to
            auto-detect; see :func:`select_state_dict`.
        model_name, patch_size: architecture description, used in messages only.
        allow_partial: load the matching tensors and log (WARNING) every missing, unexpected or
            mismatched key instead of raising.
    Returns:
        dict report with ``source``, ``loaded`` (list of keys), ``missing``, ``unexpected``,
        ``mismatched`` (list of ``(key, ckpt_shape, model_shape)``), ``dropped`` (head and other
        deliberately ignored keys), ``resized`` (keys interpolated); ``{'random_init': True}`` for an
        empty path.
    Raises:
        FileNotFoundError (missing file), ibot.checkpoint.UnsafeCheckpointError (file needs
        unpickling of arbitrary objects), PretrainedWeightsError (bad key, wrong architecture).
    """
    arch = f"{model_name or type(unwrap(model)).__name__}" + (f"/{patch_size}" if patch_size else "")
    if not pretrained_weights:
        logger.warning("no pretrained weights given (--pretrained_weights is empty): evaluating %s with "
                       "RANDOM initialisation", arch)
        return {"random_init": True}
    if pretrained_weights in ("download", "supervised"):
        raise PretrainedWeightsError(
            f"--pretrained_weights {pretrained_weights!r} would download public weights; this "
            f"implementation never downloads: pass the path of a local checkpoint file instead")
    pretrained_weights = os.fspath(pretrained_weights)
    if not os.path.isfile(pretrained_weights):
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained_weights}")

    checkpoint = safe_load(pretrained_weights)
    raw, where = select_state_dict(checkpoint, checkpoint_key, source=pretrained_weights)
    ckpt_sd, dropped = backbone_state_dict(raw)
    target = unwrap(model)
    model_sd = target.state_dict()

    resized = []
    if "pos_embed" in ckpt_sd and "pos_embed" in model_sd:
        pe, mpe = ckpt_sd["pos_embed"], model_sd["pos_embed"]
        if pe.shape != mpe.shape and pe.ndim == 3 and pe.shape[-1] == mpe.shape[-1]:
            extra = getattr(target, "num_extra_tokens", 1)
            grid = getattr(getattr(target, "patch_embed", None), "grid_size", None)  # (h, w) of the model
            grid = tuple(grid) if grid is not None and grid[0] * grid[1] == mpe.shape[1] - extra else None
            ckpt_sd["pos_embed"] = resize_pos_embed(pe, mpe.shape[1] - extra, extra, new_grid=grid)
            resized.append("pos_embed")
            logger.info("%s: pos_embed resized from %s to %s", pretrained_weights, tuple(pe.shape), tuple(mpe.shape))

    for k in [k for k in ckpt_sd if k.startswith("head.") and k not in model_sd]:
        dropped.append(k)  # a classification head inside the backbone (e.g. Swin's num_classes=1000 head)
        del ckpt_sd[k]
    if "masked_embed" in ckpt_sd and "masked_embed" not in model_sd:
        dropped.append("masked_embed")
        del ckpt_sd["masked_embed"]
    if "fc_norm.weight" in model_sd and "norm.weight" not in model_sd:
        # mean-pooling model (avgpool_patchtokens 1): the final norm is an Identity, as in the official code
        for k in ("norm.weight", "norm.bias"):
            if k in ckpt_sd:
                dropped.append(k)
                del ckpt_sd[k]

    missing = [k for k in model_sd if k not in ckpt_sd and not _is_benign_missing(k, model_sd, ckpt_sd)]
    kept_default = [k for k in model_sd if k not in ckpt_sd and k not in missing]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    mismatched = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in ckpt_sd.items()
                  if k in model_sd and v.shape != model_sd[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {pretrained_weights}{where} does not match the {arch} backbone:"]
        if missing:
            lines.append(f"  missing backbone keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines.append("  shape mismatches (key, checkpoint, model): " + "; ".join(
                f"{k} {a} vs {b}" for k, a, b in mismatched))
        lines.append(f"  ({len(ckpt_sd)} backbone tensors in the checkpoint, {len(model_sd)} in the model; "
                     f"check --arch / --patch_size / --checkpoint_key)")
        message = "\n".join(lines)
        if not allow_partial:
            raise PretrainedWeightsError(message)
        logger.warning("PARTIAL LOAD (allow_partial=True): %s", message)
    to_load = {k: v for k, v in ckpt_sd.items() if k in model_sd and v.shape == model_sd[k].shape}
    target.load_state_dict(to_load, strict=False)
    if dropped:
        logger.info("%s: ignored non-backbone entries: %s", pretrained_weights, dropped)
    if kept_default:
        logger.info("%s: kept the model's own values for %s", pretrained_weights, kept_default)
    logger.info("Pretrained weights found at %s%s and loaded into %s (%d tensors)",
                pretrained_weights, where, arch, len(to_load))
    print(f"Pretrained weights found at {pretrained_weights}{where}: {len(to_load)} tensors loaded"
          + (f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched)"
             if (missing or unexpected or mismatched) else ""))
    return {"source": pretrained_weights + where, "loaded": sorted(to_load), "missing": missing,
            "unexpected": unexpected, "mismatched": mismatched, "dropped": dropped, "resized": resized}
