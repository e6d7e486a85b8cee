"""The data pipelines of the official detection config (mmdet 2.x semantics), on NumPy arrays.

A sample is ``(image uint8 (H, W, 3) RGB, target)`` with ``target`` = ``boxes`` float32 (G, 4)
``(x1, y1, x2, y2)`` pixels, ``labels`` int64 (G,), ``masks`` uint8 (G, H, W).

Training (:class:`TrainTransform`): horizontal flip (p = 0.5), then one of two policies drawn with
equal probability (mmdet ``AutoAugment``): (a) keep-ratio resize to a short side drawn from
``train_scales`` with the long side capped; (b) keep-ratio resize to a short side from the first
``crop_scales`` list, random crop with sides drawn in the absolute range (boxes clipped, empty ones
dropped, an empty crop allowed), then resize as in (a). Then normalisation with the ImageNet mean/std
in 0-255 units; padding to a multiple of 32 happens when batching (:func:`collate`).

Test (:class:`EvalTransform`): one keep-ratio resize to (``img_scale``, ``5 * img_scale / 3``).

mmcv's keep-ratio rule: ``factor = min(long_cap / max(h, w), short / min(h, w))``, new size
``int(side * factor + 0.5)``; boxes scale by ``new_w / w`` and ``new_h / h`` and are clipped to the
image. Images are resized bilinearly (Pillow), masks by nearest neighbour.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ibot.detection.presets import crop_scales, eval_scale, train_scales

__all__ = ["MEAN", "STD", "rescale_size", "resize", "hflip", "random_crop", "normalize",
           "TrainTransform", "EvalTransform", "collate", "SIZE_DIVISOR"]

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
SIZE_DIVISOR = 32


def rescale_size(height: int, width: int, short: int, long_cap: int) -> Tuple[int, int]:
    """mmcv ``rescale_size`` with ``scale=(long_cap, short)``: the new ``(height, width)``."""
    factor = min(long_cap / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: np.ndarray, target: Dict[str, np.ndarray], short: int, long_cap: int):
    """Keep-ratio resize of an image and its target; returns ``(image, target, (w_scale, h_scale))``."""
    h, w = image.shape[:2]
    nh, nw = rescale_size(h, w, short, long_cap)
    out = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    sw, sh = nw / w, nh / h
    new = dict(target)
    boxes = target["boxes"] * np.array([sw, sh, sw, sh], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
    new["boxes"] = boxes.astype(np.float32)
    if "masks" in target:
        new["masks"] = np.stack([np.asarray(Image.fromarray(m).resize((nw, nh), Image.Resampling.NEAREST))
                                 for m in target["masks"]]) if len(target["masks"]) else \
            np.zeros((0, nh, nw), dtype=np.uint8)
    return out, new, (sw, sh)


def hflip(image: np.ndarray, target: Dict[str, np.ndarray]):
    """Horizontal flip: ``x1' = W - x2``, ``x2' = W - x1`` (mmdet 2.x ``bbox_flip``)."""
    w = image.shape[1]
    new = dict(target)
    boxes = target["boxes"].copy()
    boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
    new["boxes"] = boxes
    if "masks" in target:
        new["masks"] = np.ascontiguousarray(target["masks"][:, :, ::-1])
    return np.ascontiguousarray(image[:, ::-1]), new


def random_crop(rng: np.random.Generator, image: np.ndarray, target: Dict[str, np.ndarray],
                size_range: Tuple[int, int]):
    """mmdet ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``.

    Crop height and width are drawn independently in ``[min(side, lo), min(side, hi)]``, the offset
    uniformly; boxes are shifted and clipped, and those left with no area are dropped with their
    labels and masks.
    """
    h, w = image.shape[:2]
    lo, hi = size_range
    ch = int(rng.integers(min(h, lo), min(h, hi) + 1))
    cw = int(rng.integers(min(w, lo), min(w, hi) + 1))
    oy = int(rng.integers(0, max(h - ch, 0) + 1))
    ox = int(rng.integers(0, max(w - cw, 0) + 1))
    boxes = target["boxes"] - np.array([ox, oy, ox, oy], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    new = {k: v[valid] for k, v in target.items() if k in ("labels",)}
    new["boxes"] = boxes[valid]
    if "masks" in target:
        new["masks"] = np.ascontiguousarray(target["masks"][valid, oy:oy + ch, ox:ox + cw])
    for k, v in target.items():
        new.setdefault(k, v)
    return np.ascontiguousarray(image[oy:oy + ch, ox:ox + cw]), new


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), ``(x - mean) / std`` in 0-255 units."""
    return torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())


def _to_tensors(target: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    out = {"boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], dtype=np.float32)).reshape(-1, 4),
           "labels": torch.from_numpy(np.ascontiguousarray(target["labels"], dtype=np.int64))}
    if "masks" in target:
        out["masks"] = torch.from_numpy(np.ascontiguousarray(target["masks"], dtype=np.uint8))
    return out


class TrainTransform:
    """Flip + the two-branch multi-scale resize / crop policy + normalisation (see module docstring).

    ``__call__(rng, image, target)`` -> ``(image (3, h, w) float32, target tensors, meta)``.
    """

    def __init__(self, img_scale: int, flip_ratio: float = 0.5):
        self.scales, self.long_cap = train_scales(img_scale)
        self.crop_first, self.crop_range = crop_scales(img_scale)
        self.flip_ratio = flip_ratio

    def __call__(self, rng: np.random.Generator, image: np.ndarray, target: Dict[str, np.ndarray]):
        if rng.random() < self.flip_ratio:
            image, target = hflip(image, target)
        if rng.integers(0, 2) == 1:
            image, target, _ = resize(image, target, int(rng.choice(self.crop_first)), self.long_cap)
            image, target = random_crop(rng, image, target, self.crop_range)
        image, target, scale = resize(image, target, int(rng.choice(self.scales)), self.long_cap)
        return normalize(image), _to_tensors(target), {"scale": scale, "size": tuple(image.shape[:2])}


class EvalTransform:
    """Single-scale keep-ratio resize to (``img_scale``, ``5 * img_scale / 3``) + normalisation."""

    def __init__(self, img_scale: int):
        self.short, self.long_cap = eval_scale(img_scale)

    def __call__(self, rng, image: np.ndarray, target: Dict[str, np.ndarray]):
        image, target, scale = resize(image, target, self.short, self.long_cap)
        return normalize(image), _to_tensors(target), {"scale": scale, "size": tuple(image.shape[:2])}


def collate(samples: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict]]):
    """Pad a list of ``(image, target, meta)`` to one batch (mmdet ``Pad(size_divisor=32)`` + stack).

    Returns ``(images (B, 3, H, W) zero-padded, H and W multiples of 32, targets list (masks padded
    to H x W), metas list)``; ``meta['size']`` is each unpadded ``(h, w)``.
    """
    heights = [s[0].shape[1] for s in samples]
    widths = [s[0].shape[2] for s in samples]
    H = -(-max(heights) // SIZE_DIVISOR) * SIZE_DIVISOR
    W = -(-max(widths) // SIZE_DIVISOR) * SIZE_DIVISOR
    images = samples[0][0].new_zeros((len(samples), 3, H, W))
    targets: List[Dict[str, torch.Tensor]] = []
    for i, (img, tgt, _) in enumerate(samples):
        images[i, :, :img.shape[1], :img.shape[2]] = img
        tgt = dict(tgt)
        if "masks" in tgt:
            m = tgt["masks"]
            padded = m.new_zeros((m.shape[0], H, W))
            padded[:, :m.shape[1], :m.shape[2]] = m
            tgt["masks"] = padded
        targets.append(tgt)
    return images, targets, [s[2] for s in samples]
