"""Multi-crop augmentation of iBOT (specification section 5), torchvision v1 transforms on PIL images.

RNG use is the official one: crop / flip / colour jitter / grayscale draw from the global torch RNG,
blur and solarisation from the global Python ``random`` RNG (``ImageFolderMask(seed=...)`` reseeds
both per sample).
"""

from __future__ import annotations

import random
from typing import List, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

__all__ = ["GaussianBlur", "Solarization", "color_jitter", "DataAugmentationiBOT", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur applied with probability ``p`` (test ``random.random() <= p``).

    Radius ~ ``U(radius_min, radius_max)`` pixels (Python ``random``), multiplied by ``radius_scale``
    (a hook for small images; 1.0 = official). Input and output: a PIL image.
    """

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0,
                 radius_scale: float = 1.0):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max
        self.radius_scale = radius_scale

    def __call__(self, img: Image.Image) -> Image.Image:
        if not random.random() <= self.prob:
            return img
        radius = random.uniform(self.radius_min, self.radius_max) * self.radius_scale
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(p={self.prob}, radius_min={self.radius_min}, "
                f"radius_max={self.radius_max}, radius_scale={self.radius_scale})")


class Solarization:
    """PIL solarisation (threshold 128) applied with probability ``p`` (test ``random.random() < p``).

    Input and output: a PIL image.
    """

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def color_jitter(scale: float = 1.0) -> transforms.ColorJitter:
    """The official ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with every strength multiplied by ``scale``
    (SimCLR's colour-distortion strength; hue capped at its maximum 0.5). ``scale`` 1.0 = official."""
    return transforms.ColorJitter(brightness=0.4 * scale, contrast=0.4 * scale, saturation=0.2 * scale,
                                  hue=min(0.1 * scale, 0.5))


class DataAugmentationiBOT:
    """iBOT multi-crop transform: PIL RGB image -> list of ``ng + nl`` float tensors.

    Output order ``[global_1, ..., global_ng, local_1, ..., local_nl]``; global crops are
    ``(3, global_crops_size, global_crops_size)``, local crops ``(3, local_crops_size,
    local_crops_size)``, normalised with the ImageNet mean/std. ``*_crops_scale``: (min, max) area
    fraction for ``RandomResizedCrop``. Global crop 1: blur p=1.0; global crops 2..ng: blur p=0.1 and
    solarise p=0.2; local crops: blur p=0.5. ``blur_radius_scale`` multiplies every blur radius and
    ``color_jitter_scale`` the colour-jitter strengths (1.0 = official for both).
    """

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 global_crops_number: int, local_crops_number: int, global_crops_size: int = 224,
                 local_crops_size: int = 96, *, blur_radius_scale: float = 1.0,
                 color_jitter_scale: float = 1.0):
        if global_crops_number < 1:
            raise ValueError(f"--global_crops_number must be >= 1, got {global_crops_number}")
        if local_crops_number < 0:
            raise ValueError(f"--local_crops_number must be >= 0, got {local_crops_number}")
        self.global_crops_number = int(global_crops_number)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_radius_scale = blur_radius_scale
        self.color_jitter_scale = color_jitter_scale

        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [color_jitter(color_jitter_scale)],
                p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        bicubic = InterpolationMode.BICUBIC
        s = blur_radius_scale

        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=tuple(global_crops_scale),
                                         interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(1.0, radius_scale=s),
            normalize,
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_crops_size, scale=tuple(global_crops_scale),
                                         interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(0.1, radius_scale=s),
            Solarization(0.2),
            normalize,
        ])
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crops_size, scale=tuple(local_crops_scale),
                                         interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(p=0.5, radius_scale=s),
            normalize,
        ])

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        crops = [self.global_transfo1(image)]
        for _ in range(self.global_crops_number - 1):
            crops.append(self.global_transfo2(image))
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global={self.global_crops_number}x{self.global_crops_size}, "
                f"local={self.local_crops_number}x{self.local_crops_size}, "
                f"blur_radius_scale={self.blur_radius_scale}, color_jitter_scale={self.color_jitter_scale})")
