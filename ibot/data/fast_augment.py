"""Faster multi-crop augmentation of iBOT, with the official random parameters.

Two transforms with :class:`~ibot.data.augment.DataAugmentationiBOT`'s constructor arguments:

* :class:`FastMultiCrop` (``--data_pipeline fast``): PIL image -> list of normalised float crops,
  like the official transform. The random parameters are drawn by :func:`draw_crop` with the very
  calls, in the very order, of the official torchvision/PIL pipeline (torch RNG: crop box, flip,
  jitter gate, jitter order and strengths, grayscale; Python ``random``: blur gate and radius,
  solarisation gate), so a seeded sample gets the same parameters as on the official path. Crop,
  resize, flip, brightness, contrast, saturation, grayscale and solarisation use the same PIL
  operations (same pixels); the hue rotation and the Gaussian blur, the two slow PIL operations,
  run in OpenCV (``COLOR_RGB2HSV_FULL`` round trip; a sampled Gaussian kernel instead of PIL's
  three box blurs). Those two differ from PIL by a few 8-bit levels (PSNR and maximum difference in
  ``docs/data_pipeline.md``; bounded by ``tests/test_pipeline_fast.py``).
* :class:`DeviceMultiCrop` (``--data_pipeline device``): the worker half of the device path. Only
  crop, resize and flip run here; it returns ``(uint8 crops, parameters)`` and
  :mod:`ibot.data.device_augment` applies the colour operations batched on the training device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from .augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationiBOT, color_jitter
from .device_augment import NUM_PARAMS, PARAM_FIELDS

__all__ = ["CropSpec", "CropDraw", "crop_specs", "draw_crop", "FastMultiCrop", "DeviceMultiCrop", "PIPELINES",
           "build_multicrop"]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)          # RandomResizedCrop's default aspect-ratio range
_FLIP_P, _JITTER_P, _GRAY_P = 0.5, 0.8, 0.2
_BLUR_RADIUS = (0.1, 2.0)
_COL = {name: i for i, name in enumerate(PARAM_FIELDS)}


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - opencv is a requirement
        raise ImportError("--data_pipeline fast needs OpenCV: pip install opencv-python-headless") from e
    cv2.setNumThreads(1)  # one loader worker = one core
    return cv2


@dataclass(frozen=True)
class CropSpec:
    """One crop of the multi-crop recipe: output side (px), area range, blur and solarisation
    probabilities (``solarize_p=None``: the crop has no solarisation step, so no RNG draw)."""
    size: int
    scale: Tuple[float, float]
    blur_p: float
    solarize_p: Optional[float]


@dataclass
class CropDraw:
    """The random parameters of one crop: box ``(top, left, height, width)`` in source pixels,
    ``flip``, and the colour parameter row laid out as :data:`ibot.data.device_augment.PARAM_FIELDS`."""
    box: Tuple[int, int, int, int]
    flip: bool
    params: np.ndarray  # (NUM_PARAMS,) float64


def crop_specs(global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
               global_crops_number: int, local_crops_number: int, global_crops_size: int = 224,
               local_crops_size: int = 96) -> List[CropSpec]:
    """The crops of specification section 5, in output order (global 1, globals 2.., locals)."""
    if global_crops_number < 1:
        raise ValueError(f"--global_crops_number must be >= 1, got {global_crops_number}")
    if local_crops_number < 0:
        raise ValueError(f"--local_crops_number must be >= 0, got {local_crops_number}")
    g, l = tuple(global_crops_scale), tuple(local_crops_scale)
    specs = [CropSpec(global_crops_size, g, 1.0, None)]
    specs += [CropSpec(global_crops_size, g, 0.1, 0.2) for _ in range(global_crops_number - 1)]
    specs += [CropSpec(local_crops_size, l, 0.5, None) for _ in range(local_crops_number)]
    return specs


def draw_crop(image, spec: CropSpec, jitter: transforms.ColorJitter,
              blur_radius_scale: float = 1.0) -> CropDraw:
    """Draw one crop's parameters with the official RNG calls in the official order.

    Torch RNG: ``RandomResizedCrop.get_params``, flip ``rand < 0.5``, ``RandomApply`` gate
    (applies if ``rand <= 0.8``), ``ColorJitter.get_params`` (order = ``randperm(4)``, then the
    strengths), grayscale ``rand < 0.2``. Python ``random``: blur gate ``random() <= p`` and radius
    ``uniform(0.1, 2.0)``, then (global crops 2..) solarisation ``random() < p``.
    """
    top, left, h, w = transforms.RandomResizedCrop.get_params(image, list(spec.scale), list(_RATIO))
    params = np.zeros(NUM_PARAMS, dtype=np.float64)
    params[_COL["order_0"]:_COL["order_3"] + 1] = (0, 1, 2, 3)
    params[_COL["brightness"]:_COL["hue"] + 1] = (1.0, 1.0, 1.0, 0.0)
    flip = bool(torch.rand(1) < _FLIP_P)
    if not _JITTER_P < torch.rand(1):
        order, b, c, s, hue = transforms.ColorJitter.get_params(
            jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        params[_COL["jitter"]] = 1.0
        params[_COL["order_0"]:_COL["order_3"] + 1] = order.tolist()
        for name, value, identity in (("brightness", b, 1.0), ("contrast", c, 1.0),
                                      ("saturation", s, 1.0), ("hue", hue, 0.0)):
            params[_COL[name]] = identity if value is None else value
    params[_COL["grayscale"]] = float(torch.rand(1) < _GRAY_P)
    if random.random() <= spec.blur_p:
        params[_COL["blur_sigma"]] = random.uniform(*_BLUR_RADIUS) * blur_radius_scale
    if spec.solarize_p is not None:
        params[_COL["solarize"]] = float(random.random() < spec.solarize_p)
    return CropDraw((top, left, h, w), flip, params)


def _crop_resize_flip(image: torch.Tensor, draw: CropDraw, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: bicubic antialiased resized crop, then the flip.

    torchvision's uint8 tensor kernel: 4-7x faster than PIL's resize on one core, PSNR 55-75 dB
    and at most 3 8-bit levels from it on photographs (``docs/data_pipeline.md``).
    """
    top, left, h, w = draw.box
    crop = TF2.resized_crop(image, top, left, h, w, [size, size],
                            interpolation=InterpolationMode.BICUBIC, antialias=True)
    return crop.flip(-1) if draw.flip else crop


def _as_tensor(image) -> torch.Tensor:
    """PIL RGB image (or (3, H, W) uint8 tensor) -> (3, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 image tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return TF.pil_to_tensor(image)


def _hue_cv2(crop: Image.Image, hue: float, cv2) -> Image.Image:
    """PIL's hue rotation (shift of the 8-bit HSV hue by ``int(255 * hue)``) through OpenCV."""
    hsv = cv2.cvtColor(np.asarray(crop), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(hue * 255) & 0xFF)  # wraps around, as in torchvision
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL), "RGB")


def _render_colour(crop: Image.Image, params: np.ndarray, cv2) -> np.ndarray:
    """Colour jitter, grayscale, blur, solarisation of one crop -> (H, W, 3) uint8 array."""
    if params[_COL["jitter"]] > 0.5:
        for k in range(4):
            op = int(params[_COL["order_0"] + k])
            if op == 0:
                crop = TF.adjust_brightness(crop, float(params[_COL["brightness"]]))
            elif op == 1:
                crop = TF.adjust_contrast(crop, float(params[_COL["contrast"]]))
            elif op == 2:
                crop = TF.adjust_saturation(crop, float(params[_COL["saturation"]]))
            elif params[_COL["hue"]] != 0.0:
                crop = _hue_cv2(crop, float(params[_COL["hue"]]), cv2)
    if params[_COL["grayscale"]] > 0.5:
        crop = crop.convert("L").convert("RGB")  # same values as rgb_to_grayscale(img, 3)
    array = np.asarray(crop)
    sigma = float(params[_COL["blur_sigma"]])
    if sigma > 0.0:
        array = cv2.GaussianBlur(array, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    if params[_COL["solarize"]] > 0.5:
        array = np.where(array >= 128, 255 - array, array).astype(np.uint8)  # ImageOps.solarize(128)
    return array


_MEAN_255 = 255.0 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_INV_STD_255 = 1.0 / (255.0 * torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def _normalize_crops(crops: List[torch.Tensor]) -> List[torch.Tensor]:
    """uint8 (3, h, w) crops -> float32 ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    return [(c.float() - _MEAN_255).mul_(_INV_STD_255) for c in crops]


class _MultiCropBase:
    """Shared constructor: the crop recipe, the official ColorJitter ranges, the blur radius scale."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 global_crops_number: int, local_crops_number: int, global_crops_size: int = 224,
                 local_crops_size: int = 96, *, blur_radius_scale: float = 1.0,
                 color_jitter_scale: float = 1.0):
        self.specs = crop_specs(global_crops_scale, local_crops_scale, global_crops_number,
                                local_crops_number, global_crops_size, local_crops_size)
        self.global_crops_number = int(global_crops_number)
        self.local_crops_number = int(local_crops_number)
        self.jitter = color_jitter(color_jitter_scale)
        self.blur_radius_scale = float(blur_radius_scale)
        self.color_jitter_scale = float(color_jitter_scale)

    def draw(self, image) -> List[CropDraw]:
        """Parameters of every crop of ``image`` (PIL image or (3, H, W) tensor), in output order,
        drawn with the official RNG sequence."""
        return [draw_crop(image, spec, self.jitter, self.blur_radius_scale) for spec in self.specs]

    def __repr__(self) -> str:
        g, l = self.specs[0], self.specs[-1]
        return (f"{type(self).__name__}(global={self.global_crops_number}x{g.size}, "
                f"local={self.local_crops_number}x{l.size}, blur_radius_scale={self.blur_radius_scale}, "
                f"color_jitter_scale={self.color_jitter_scale})")


class FastMultiCrop(_MultiCropBase):
    """Drop-in for :class:`~ibot.data.augment.DataAugmentationiBOT`: PIL RGB image -> list of
    ``ng + nl`` float32 crops ``(3, size, size)``, ImageNet-normalised, same order and parameters.

    ``output="uint8"`` returns the un-normalised ``(3, size, size)`` uint8 crops instead (for a
    consumer that normalises on the device with :func:`ibot.data.device_augment.normalize_uint8`).
    """

    def __init__(self, *args, output: str = "float", **kwargs):
        super().__init__(*args, **kwargs)
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.output = output
        self._cv2 = None

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        if self._cv2 is None:
            self._cv2 = _cv2()
        image = _as_tensor(image)
        crops = []
        for spec, draw in zip(self.specs, self.draw(image)):
            crop = _crop_resize_flip(image, draw, spec.size)
            pil = Image.fromarray(np.ascontiguousarray(crop.permute(1, 2, 0).numpy()), "RGB")
            array = _render_colour(pil, draw.params, self._cv2)
            if not array.flags.writeable:  # a view of a PIL image's memory
                array = array.copy()
            crops.append(torch.from_numpy(array).permute(2, 0, 1))
        if self.output == "uint8":
            return crops
        return _normalize_crops(crops)

    def __getstate__(self):  # OpenCV is imported again in each worker
        state = dict(self.__dict__)
        state["_cv2"] = None
        return state


class DeviceMultiCrop(_MultiCropBase):
    """Worker half of ``--data_pipeline device``: PIL RGB image -> ``(crops, params)``.

    ``crops``: list of ``ng + nl`` uint8 tensors ``(3, size, size)`` (cropped, resized, flipped);
    ``params``: float32 tensor ``(ng + nl, NUM_PARAMS)``, row ``k`` = the colour parameters of crop
    ``k`` (:data:`ibot.data.device_augment.PARAM_FIELDS`), drawn with the official RNG sequence.
    """

    returns_params = True  # ImageFolderMask then yields (crops, target, masks, params)

    def __call__(self, image: Image.Image) -> Tuple[List[torch.Tensor], torch.Tensor]:
        image = _as_tensor(image)
        crops, rows = [], []
        for spec, draw in zip(self.specs, self.draw(image)):
            crops.append(_crop_resize_flip(image, draw, spec.size))
            rows.append(draw.params)
        return crops, torch.from_numpy(np.stack(rows).astype(np.float32))


PIPELINES = ("pil", "fast", "device")


def build_multicrop(pipeline: str, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                    global_crops_number: int, local_crops_number: int, global_crops_size: int = 224,
                    local_crops_size: int = 96, *, blur_radius_scale: float = 1.0,
                    color_jitter_scale: float = 1.0):
    """The multi-crop transform of ``--data_pipeline``: ``pil`` (the official PIL pipeline, float
    crops), ``fast`` (:class:`FastMultiCrop`, uint8 crops normalised on the device) or ``device``
    (:class:`DeviceMultiCrop`, uint8 crops + colour parameters). The training loop turns any of
    them into normalised crops on the device with :func:`ibot.data.device_augment.prepare_crops`."""
    args = (global_crops_scale, local_crops_scale, global_crops_number, local_crops_number,
            global_crops_size, local_crops_size)
    kw = dict(blur_radius_scale=blur_radius_scale, color_jitter_scale=color_jitter_scale)
    if pipeline == "pil":
        return DataAugmentationiBOT(*args, **kw)
    if pipeline == "fast":
        return FastMultiCrop(*args, output="uint8", **kw)
    if pipeline == "device":
        return DeviceMultiCrop(*args, **kw)
    raise ValueError(f"--data_pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
