"""Inputs of the analysis figures: the device, a frozen ViT with its weights, image files."""
import os

import torch
from PIL import Image

from ibot.eval.features import IMG_EXTENSIONS
from ibot.eval.weights import load_pretrained_weights
from ibot.models import arch_choices, create_backbone, is_model, model_family

__all__ = ["vit_arch_choices", "pick_device", "build_vit", "list_images", "load_rgb"]


def vit_arch_choices():
    """``--arch`` choices of the analysis scripts: the registered ViTs (they need a [CLS] token and
    ``get_last_selfattention``)."""
    return arch_choices("vit")


def pick_device(name=None):
    """``torch.device(name)``, or CUDA when available else CPU when ``name`` is None/''."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_vit(arch, patch_size, pretrained_weights="", checkpoint_key="teacher", device="cpu", img_size=224,
              **kwargs):
    """Registry ViT ``arch`` without head (``num_classes=0``), weights loaded (§1.3), eval mode, no grad.

    Args:
        arch: a registered ViT (the analysis figures need ``get_last_selfattention``).
        pretrained_weights: checkpoint path ('' = random init, logged as a warning).
        checkpoint_key: entry of a full checkpoint (``teacher``/``student``); backbone files are
            auto-detected by :func:`ibot.eval.weights.load_pretrained_weights`.
        img_size: size the position embedding is built for (others are interpolated at run time).
    Returns:
        the ViT on ``device``.
    """
    if not is_model(arch) or model_family(arch) != "vit":
        raise ValueError(f"--arch {arch!r} is not supported here: these analysis tools need a ViT with a "
                         f"[CLS] token and get_last_selfattention ({', '.join(vit_arch_choices())})")
    model = create_backbone(arch, patch_size=patch_size, img_size=img_size, num_classes=0, **kwargs)
    load_pretrained_weights(model, pretrained_weights, checkpoint_key, arch, patch_size)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def list_images(folder, prefix=None):
    """Sorted paths of the image files directly inside ``folder`` (optionally starting with ``prefix``)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTENSIONS)
                   and (prefix is None or n.startswith(prefix)))
    return [os.path.join(folder, n) for n in names]


def load_rgb(path):
    """Open an image file as a fully loaded PIL RGB image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as img:
        return img.convert("RGB")
