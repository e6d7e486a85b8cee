"""Batched colour augmentation of iBOT crops on any torch device, with per-crop parameters.

The multi-crop pipeline of specification section 5 applies, after the crop and the flip, a colour
jitter (brightness, contrast, saturation, hue in a random order, with probability 0.8), a grayscale
conversion, a Gaussian blur and a solarisation, each with its own probability, and normalises. Here
those operations run on whole batches of crops on the training device (or on the CPU), each crop
with its own parameters, drawn beforehand in the data loader workers with the official RNG calls
(:mod:`ibot.data.fast_augment`). The parameters of one crop are one row of a float tensor, laid out
as :data:`PARAM_FIELDS`.

Semantics follow the PIL operations of the official path, in float32 on ``[0, 1]`` images:

* brightness ``f``: ``clamp(x * f)``; contrast ``f``: blend with the mean of the grayscale image
  (rounded to a whole 8-bit level, as PIL does); saturation ``f``: blend with the per-pixel
  grayscale image; hue ``h``: rotation of the HSV hue by ``trunc(255 h) / 255`` of a turn (PIL
  shifts its 8-bit hue channel by ``int(255 h)``). Grayscale weights are ITU-R 601 (PIL ``L``).
* Gaussian blur of standard deviation ``sigma`` pixels (PIL's ``radius``): a sampled separable
  kernel over ``+-ceil(3 sigma)`` pixels with edge replication (PIL approximates the Gaussian by
  three box blurs; the difference is measured in ``docs/data_pipeline.md``).
* solarisation: ``1 - x`` where ``x >= 128 / 255`` (PIL's threshold 128).

PIL rounds to 8 bits after every operation and this module does not, so pixels differ from the PIL
path by a few 8-bit levels; ``tests/test_pipeline_device.py`` bounds the difference.

The parameters stay on the host, where the crops each operation applies to are selected; no
operation reads a value back from the device, so CUDA execution stays asynchronous.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PARAM_FIELDS", "NUM_PARAMS", "apply_color_ops", "normalize_uint8",
           "augment_uint8", "prepare_crops"]

#: columns of a crop's parameter row; ``order_k`` holds the index (0 brightness, 1 contrast,
#: 2 saturation, 3 hue) of the k-th jitter operation, as ``torch.randperm(4)`` in ColorJitter.
PARAM_FIELDS = ("jitter", "order_0", "order_1", "order_2", "order_3", "brightness", "contrast",
                "saturation", "hue", "grayscale", "blur_sigma", "solarize")
NUM_PARAMS = len(PARAM_FIELDS)
_COL = {name: i for i, name in enumerate(PARAM_FIELDS)}

_GRAY = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma with PIL's ``L`` weights."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _per_crop(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _brightness(x, f):
    return (x * _per_crop(f)).clamp_(0.0, 1.0)


def _contrast(x, f):
    # PIL: mean of the 8-bit L image, rounded to a whole level
    mean = torch.floor(_gray(x).mean(dim=(1, 2, 3)) * 255.0 + 0.5) / 255.0
    mean = _per_crop(mean)
    return (mean + _per_crop(f) * (x - mean)).clamp_(0.0, 1.0)


def _saturation(x, f):
    gray = _gray(x)
    return (gray + _per_crop(f) * (x - gray)).clamp_(0.0, 1.0)


def _hue(x, h):
    """Rotate the hue of (N, 3, H, W) images in [0, 1] by ``h`` (N,) turns (HSV hexcone model)."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # hue in sixths of a turn, by which channel is the largest
    hr = (g - b) / safe
    hg = 2.0 + (b - r) / safe
    hb = 4.0 + (r - g) / safe
    hue6 = torch.where(argmax == 0, hr, torch.where(argmax == 1, hg, hb))
    hue = torch.where(delta > 0, hue6 / 6.0, torch.zeros_like(hue6))
    hue = torch.remainder(hue + h.view(-1, 1, 1), 1.0)
    # back to RGB: each channel is v - delta * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    v = maxc.unsqueeze(1)
    d = delta.unsqueeze(1)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    return v - d * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with per-crop ``sigma`` (N,) pixels (> 0).

    Each crop's kernel has taps at the integer offsets within ``ceil(3 sigma)`` (so a crop's result
    does not depend on the other crops), normalised to sum 1, inside a common support of ``radius``
    (the caller passes ``ceil(3 * max sigma)``); edges replicate the border pixel (as PIL's box blur does).
    """
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
    s = sigma.to(x.dtype).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = torch.where(offsets.abs() <= torch.ceil(3.0 * s), kernel, torch.zeros_like(kernel))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    weight = kernel.repeat_interleave(c, dim=0)  # (N*C, 2R+1)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, weight.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, weight.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without waiting for the device (pinned staging on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_color_ops(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarisation of a batch of crops, each with its parameters.

    ``x``: (N, 3, H, W) float in [0, 1] (already cropped, resized and flipped); ``params``: (N,
    :data:`NUM_PARAMS`) rows laid out as :data:`PARAM_FIELDS`, best on the CPU (as the loader
    delivers them: the crops each operation applies to are then selected on the host, and a CUDA
    ``x`` is never read back). Returns a new (N, 3, H, W) float tensor in [0, 1], operations in the
    official order: jitter (its four operations in each crop's own order, where ``jitter`` is 1),
    grayscale, blur, solarisation. Each operation runs once, on the crops it applies to.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected crops of shape (N, 3, H, W), got {tuple(x.shape)}")
    if params.shape != (x.shape[0], NUM_PARAMS):
        raise ValueError(f"expected parameters of shape ({x.shape[0]}, {NUM_PARAMS}), "
                         f"got {tuple(params.shape)}")
    host = params.detach().to("cpu", torch.float64)
    factors = host[:, _COL["brightness"]:_COL["hue"] + 1].clone()
    # PIL shifts the 8-bit hue channel by int(255 h): a whole number of 1/255 turns, towards zero
    factors[:, 3] = torch.trunc(factors[:, 3] * 255.0) / 255.0
    jitter = host[:, _COL["jitter"]] > 0.5
    order = host[:, _COL["order_0"]:_COL["order_3"] + 1].round().long()
    sigma = host[:, _COL["blur_sigma"]]
    blur_radius = max(1, math.ceil(3 * float(sigma.max())))  # 6 taps each side for the official 2.0
    # the steps in the official order, each with the crops it applies to (selected on the host)
    steps = [(k, op_index, jitter & (order[:, k] == op_index)) for k in range(4) for op_index in range(4)]
    steps += [(None, "gray", host[:, _COL["grayscale"]] > 0.5), (None, "blur", sigma > 0),
              (None, "solarize", host[:, _COL["solarize"]] > 0.5)]
    steps = [(k, op, chosen.nonzero().flatten()) for k, op, chosen in steps if chosen.any()]
    if not steps:
        return x.clone()
    # one transfer of every index and per-crop value, then views of it on the device
    lengths = [len(idx) for _, _, idx in steps]
    idx_all = torch.cat([idx for _, _, idx in steps])
    values = torch.cat([factors[idx, op] if isinstance(op, int) else sigma[idx] if op == "blur"
                        else torch.zeros(len(idx), dtype=torch.float64) for _, op, idx in steps])
    idx_all = _to_device(idx_all, x.device).split(lengths)
    values = _to_device(values.to(x.dtype), x.device).split(lengths)
    x = x.clone()
    for (_, op, _), idx, v in zip(steps, idx_all, values):
        y = x.index_select(0, idx)
        if isinstance(op, int):
            y = _JITTER_OPS[op](y, v)
        elif op == "gray":
            y = _gray(y).expand(-1, 3, -1, -1)
        elif op == "blur":
            y = _gaussian_blur(y, v, blur_radius)
        else:
            y = torch.where(y >= 128.0 / 255.0, 1.0 - y, y)
        x.index_copy_(0, idx, y)
    return x


@functools.lru_cache(maxsize=16)
def _mean_std(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device, dtype: torch.dtype):
    """(1, 3, 1, 1) mean and std on ``device``, made once (a host copy per batch could wait for the GPU)."""
    m = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1)
    return m.to(device), s.to(device)


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float ``(x / 255 - mean) / std`` (ToTensor + Normalize of the PIL path)."""
    m, s = _mean_std(tuple(mean), tuple(std), x.device, dtype)
    return (x.to(dtype) / 255.0 - m) / s


def augment_uint8(x: torch.Tensor, params: torch.Tensor, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """(N, 3, H, W) uint8 crops + (N, NUM_PARAMS) parameters -> normalised float32 crops.

    The device half of the device augmentation path: :func:`apply_color_ops` then the ImageNet
    normalisation, on ``x``'s device.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 crops, got {x.dtype}")
    y = apply_color_ops(x.float() / 255.0, params)
    m, s = _mean_std(tuple(mean), tuple(std), x.device, y.dtype)
    return (y - m) / s


def prepare_crops(crops: Sequence[torch.Tensor], params: Optional[torch.Tensor], device: torch.device,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> List[torch.Tensor]:
    """A collated batch of crops -> the list of float crop batches the training step takes, on ``device``.

    ``crops``: list of ``(B, 3, h, w)`` tensors, one per crop position, as the DataLoader collates them:
    float (normalised already: ``--data_pipeline pil``, only moved), or uint8 (``fast``: normalised
    here; ``device``: with ``params``, the ``(B, n_crops, NUM_PARAMS)`` colour parameters, augmented
    here by :func:`augment_uint8`). Crops of one size are augmented in one batch.
    """
    if not crops:
        return []
    if crops[0].dtype != torch.uint8:
        return [c.to(device, non_blocking=True) for c in crops]
    if params is None:
        return [normalize_uint8(c.to(device, non_blocking=True), mean, std) for c in crops]
    batch = crops[0].shape[0]
    if params.shape != (batch, len(crops), NUM_PARAMS):
        raise ValueError(f"expected colour parameters of shape ({batch}, {len(crops)}, {NUM_PARAMS}), "
                         f"got {tuple(params.shape)}")
    out: List[Optional[torch.Tensor]] = [None] * len(crops)
    by_size: dict = {}
    for k, c in enumerate(crops):
        by_size.setdefault(tuple(c.shape[-2:]), []).append(k)
    for ks in by_size.values():
        # each crop batch comes pinned from the DataLoader: copy, then concatenate on the device
        x = torch.cat([crops[k].to(device, non_blocking=True) for k in ks])
        rows = params[:, ks].transpose(0, 1).reshape(-1, NUM_PARAMS)  # crop-major, as x
        for k, y in zip(ks, augment_uint8(x, rows, mean, std).split(batch)):
            out[k] = y
    return out
