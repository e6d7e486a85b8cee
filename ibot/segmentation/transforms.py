"""The ADE20K train and test pipelines of the official configs (mmseg 0.12 ``_base_/datasets/ade20k.py``).

Train: ratio-range keep-ratio resize -> random crop with ``cat_max_ratio`` -> horizontal flip ->
photometric distortion -> normalise -> pad to the crop (image 0, label 255).
Test: keep-ratio resize to the test scale (per ratio for ``_ms``, with the SETR short-side rule) ->
normalise; the label stays at the original size (the metric is computed there).

Images are ``uint8 (H, W, 3)`` RGB arrays, labels ``uint8 (H, W)`` (already zero-reduced: 255 =
ignore). Randomness comes from a ``numpy.random.Generator`` passed in, drawn in the order mmseg draws
it, so a sample's augmentation is a function of its seed (exact resume, any number of workers).
Resizing follows mmcv / OpenCV: bilinear without antialiasing (half-pixel centres) for images,
nearest (``floor``) for labels; sizes ``int(x * scale + 0.5)``. HSV conversions use the 8-bit
OpenCV convention (H in 0..179), computed in floating point and rounded.
"""
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IMG_MEAN", "IMG_STD", "IGNORE_INDEX", "rescale_size", "resize_image", "resize_label",
           "random_scale", "random_crop", "photometric_distortion", "normalize", "pad_to",
           "TrainPipeline", "test_scales", "prepare_test_image"]

IMG_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
IMG_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
IGNORE_INDEX = 255


def rescale_size(height, width, scale):
    """Keep-ratio target ``(h, w)`` for ``scale = (long, short)`` (mmcv ``imrescale``): the factor
    ``min(long / max(h, w), short / min(h, w))``, sizes rounded half up."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(img, size):
    """Bilinear resize (no antialias, half-pixel centres) of uint8 ``(H, W, 3)`` to ``size=(h, w)``; uint8."""
    if tuple(img.shape[:2]) == tuple(size):
        return img
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_label(label, size):
    """Nearest resize (source index ``floor(i * in / out)``) of a uint8 ``(H, W)`` label map."""
    if tuple(label.shape) == tuple(size):
        return label
    t = torch.from_numpy(np.array(label))[None, None]
    return F.interpolate(t, size=tuple(size), mode="nearest")[0, 0].numpy()


def random_scale(img, label, scale, ratio_range, rng):
    """mmseg ``Resize(img_scale=scale, ratio_range=...)``: ratio ~ U(range), scale ``int(s * ratio)``,
    keep-ratio resize of both. Returns ``(img, label)``."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(img.shape[0], img.shape[1], target)
    return resize_image(img, size), resize_label(label, size)


def random_crop(img, label, crop_size, cat_max_ratio, rng, ignore_index=IGNORE_INDEX):
    """mmseg ``RandomCrop``: a random ``crop_size=(h, w)`` window (smaller images are kept whole);
    with ``cat_max_ratio < 1`` up to 10 windows are drawn until no class covers more than that share
    of the labelled pixels (and at least two classes are present); the last draw is used otherwise."""
    def draw():
        margin_h = max(img.shape[0] - crop_size[0], 0)
        margin_w = max(img.shape[1] - crop_size[1], 0)
        y, x = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        return y, y + crop_size[0], x, x + crop_size[1]

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = label[box[0]:box[1], box[2]:box[3]]
            values, counts = np.unique(window, return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return img[box[0]:box[1], box[2]:box[3]], label[box[0]:box[1], box[2]:box[3]]


def _rgb_to_hsv8(img):
    """uint8 RGB -> float HSV in OpenCV's 8-bit ranges (H 0..180, S and V 0..255), rounded."""
    rgb = img.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta * 255.0 / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(delta, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / safe,
                 np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(delta > 0, h, 0.0)
    h = np.where(h < 0, h + 360.0, h)
    hsv = np.stack([np.round(h / 2.0) % 180, np.round(s), v], -1)
    return hsv.astype(np.uint8)


def _hsv8_to_rgb(hsv):
    """Inverse of :func:`_rgb_to_hsv8` (uint8 in, uint8 out)."""
    h = hsv[..., 0].astype(np.float32) * 2.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    c = v * s
    hp = (h / 60.0) % 6
    x = c * (1 - np.abs(hp % 2 - 1))
    zero = np.zeros_like(c)
    sector = np.floor(hp).astype(int)
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    out = np.zeros(hsv.shape, np.float32)
    for k, (r, g, b) in enumerate(table):
        sel = sector == k
        out[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
    out += (v - c)[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def photometric_distortion(img, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg ``PhotoMetricDistortion``: each step with probability 1/2, in mmseg's order and draws:
    brightness (+U(-32, 32)), contrast (x U(0.5, 1.5)) first or last, saturation (x U(0.5, 1.5)),
    hue (+ randint(-18, 18) mod 180); every step clips to uint8."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        if rng.integers(2):
            return convert(x, alpha=rng.uniform(*contrast_range))
        return x

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = _rgb_to_hsv8(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = _hsv8_to_rgb(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv8(img)
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = _hsv8_to_rgb(hsv)
    if mode == 0:
        img = contrast(img)
    return img


def normalize(img):
    """uint8 RGB ``(H, W, 3)`` -> float32 tensor ``(3, H, W)`` normalised with the ImageNet mean/std (0-255)."""
    out = (img.astype(np.float32) - IMG_MEAN) / IMG_STD
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def pad_to(image, label, size, ignore_index=IGNORE_INDEX):
    """Pad a ``(3, h, w)`` tensor with 0 and a ``(h, w)`` label with ``ignore_index`` at the bottom /
    right to ``size=(H, W)``. Returns ``(image, label int64)``."""
    h, w = image.shape[-2:]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    label = torch.from_numpy(np.array(label)).long()
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


class TrainPipeline:
    """The official train pipeline for one preset; ``__call__(img, label, rng) -> (image (3, S, S), label (S, S))``."""

    def __init__(self, crop_size, scale, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5,
                 photometric=True):
        self.crop = (crop_size, crop_size)
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric

    def __call__(self, img, label, rng):
        img, label = random_scale(img, label, self.scale, self.ratio_range, rng)
        img, label = random_crop(img, label, self.crop, self.cat_max_ratio, rng)
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        return pad_to(normalize(img), label, self.crop)


def test_scales(height, width, scale, ratios=(1.0,), setr_resize=False, crop_size=None):
    """Resized ``(h, w)`` of an ``height x width`` image for every test ratio.

    ``scale`` is the config's ``img_scale`` (long, short); ratio r gives ``(int(long r), int(short r))``
    (mmseg ``MultiScaleFlipAug``). With ``setr_resize`` (the ``_ms`` configs) the short side becomes
    ``max(crop_size, int(short r))`` and the long side follows the aspect ratio (``SETR_Resize``).
    """
    sizes = []
    for r in ratios:
        target = (int(scale[0] * r), int(scale[1] * r))
        if setr_resize:
            short = max(crop_size, min(target))
            target = (short * max(height, width) / min(height, width), short)
        sizes.append(rescale_size(height, width, target))
    return sizes


def prepare_test_image(img, size):
    """uint8 RGB image -> normalised ``(3, h, w)`` tensor at ``size`` (bilinear)."""
    return normalize(resize_image(img, size))
