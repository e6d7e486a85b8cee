"""Small pieces shared by the analysis scripts: device choice, ViT construction + weight loading,
image listing and loading."""
import os

import torch
from PIL import Image

import models
from ibot.eval.weights import load_pretrained_weights

VIT_ARCHS = ["vit_tiny", "vit_small", "vit_base", "vit_large"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = ["VIT_ARCHS", "IMG_EXTENSIONS", "pick_device", "build_vit", "list_images", "load_rgb"]


def pick_device(name=None):
    """``torch.device(name)``, or CUDA when available else CPU when ``name`` is None/''."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_vit(arch, patch_size, pretrained_weights="", checkpoint_key="teacher", device="cpu", img_size=224,
              **kwargs):
    """Build ``models.<arch>(patch_size, num_classes=0)``, load weights (§1.3), eval mode, no grad.

    Args:
        arch: one of :data:`VIT_ARCHS` (the analysis figures need ``get_last_selfattention``).
        pretrained_weights: checkpoint path ('' = random init, logged as a warning).
        checkpoint_key: entry of a full checkpoint (``teacher``/``student``); backbone files are
            auto-detected by :func:`ibot.pretrained.load_pretrained_weights`.
        img_size: size the position embedding is built for (others are interpolated at run time).
    Returns:
        the ViT on ``device``.
    """
    if arch not in VIT_ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported here: these analysis tools need a ViT with a "
                         f"[CLS] token and get_last_selfattention ({', '.join(VIT_ARCHS)})")
    model = getattr(models, arch)(patch_size=patch_size, num_classes=0, img_size=img_size, **kwargs)
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
