"""Drawing helpers shared by the analysis tools (evaluation.md §3): attention extraction and mass
thresholding, colour composites, colour maps, panels and grids, line and box overlays.

Everything returns NumPy ``uint8`` RGB arrays ``(H, W, 3)`` (or torch tensors where stated) and
writes PNG/JPEG files through Pillow, so nothing depends on a display (no pyplot; matplotlib is used
only for its colour-map tables).

Shapes: ``B`` images, ``nh`` attention heads, ``p`` patch size, ``h, w`` patch grid,
``H = h * p``, ``W = w * p`` pixels, ``T = h * w`` patch tokens.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# colour-composite palette of the official attention figure: blue, red, yellow, navy, green, purple
PALETTE = np.array([[0, 0, 255], [255, 0, 0], [255, 255, 0], [0, 0, 128], [0, 128, 0], [128, 0, 128]],
                   dtype=np.float64) / 255.0

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PALETTE", "crop_to_patch_multiple", "cls_attention",
           "mass_threshold_mask", "upsample_nearest", "denormalize", "to_uint8", "minmax",
           "colorize", "attention_composite", "hstack", "image_grid", "save_image",
           "draw_correspondences", "overlay_patch_mask", "paste_box", "patch_window_crop"]


def crop_to_patch_multiple(images, patch_size):
    """Crop ``images (..., H, W)`` (top-left kept) to ``(..., H - H % p, W - W % p)``."""
    H, W = images.shape[-2:]
    return images[..., :H - H % patch_size, :W - W % patch_size]


@torch.no_grad()
def cls_attention(model, images):
    """Last-layer [CLS] -> patch attention of a ViT, per head, on the patch grid.

    Args:
        model: ViT with ``get_last_selfattention`` and ``patch_size``.
        images: (B, 3, H, W) with H, W multiples of the patch size.
    Returns:
        (B, nh, h, w) float tensor; row sums of the full (1+T) attention are 1, so each map sums to
        1 - attention([CLS] -> [CLS]).
    """
    p = model.patch_size
    B, _, H, W = images.shape
    attn = model.get_last_selfattention(images)              # (B, nh, 1+T, 1+T)
    nh = attn.shape[1]
    return attn[:, :, 0, 1:].reshape(B, nh, H // p, W // p).float()


def mass_threshold_mask(attn, threshold):
    """Keep the smallest set of highest-attention entries holding ``threshold`` of the mass.

    Official rule: sort ascending, normalise to sum 1, cumulative sum, keep the entries whose
    cumulative sum is ``> 1 - threshold``; the original order is restored.

    Args:
        attn: (..., T) non-negative tensor (e.g. (B, nh, T) [CLS] -> patch attention).
        threshold: share of the mass to keep, in [0, 1].
    Returns:
        bool tensor (..., T).
    """
    vals, idx = torch.sort(attn, dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(vals.dtype).tiny)
    keep_sorted = torch.cumsum(vals, dim=-1) > (1 - threshold)
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(-1, idx, keep_sorted)
    return mask


def upsample_nearest(maps, factor):
    """Nearest upsampling ``(..., h, w) -> (..., h * factor, w * factor)`` (any dtype, torch)."""
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1])
    dtype = x.dtype
    x = F.interpolate(x.float(), scale_factor=factor, mode="nearest")
    return x.reshape(*shape[:-2], x.shape[-2], x.shape[-1]).to(dtype)


def denormalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Undo ``Normalize(mean, std)``: (..., 3, H, W) -> same shape clamped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * s + m).clamp(0, 1)


def to_uint8(image):
    """(3, H, W) tensor or (H, W, 3) / (H, W) array in [0, 1] -> uint8 (H, W, 3) array."""
    if torch.is_tensor(image):
        image = image.detach().cpu().float()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def minmax(x, eps=1e-12):
    """Min-max normalise an array/tensor to [0, 1] (a constant input gives zeros); same shape."""
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi - lo > eps else np.zeros_like(x)


def colorize(values, cmap="viridis", normalize=True):
    """Map a 2-D array (H, W) to uint8 RGB (H, W, 3) with a matplotlib colour map (no display)."""
    import matplotlib
    v = minmax(values) if normalize else np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    rgba = matplotlib.colormaps[cmap](v)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def attention_composite(image, maps, masks, heads=None, palette=PALETTE, value_threshold=0.2):
    """Colour composite of thresholded attention heads over a dimmed grey image (official figure).

    * the image is converted to grey, rescaled into the bright range [192, 256] / 256 and dimmed to
      10 % (so the composite shows colours on a dark version of the input);
    * each head's map is multiplied by its threshold mask and, at each pixel, only the head with the
      largest value survives (ties go to the earlier head);
    * each surviving head map is min-max normalised and blended where it is > ``value_threshold``,
      with weight sqrt(value), in the head's palette colour.

    Args:
        image: (3, H, W) tensor or (H, W, 3) array in [0, 1].
        maps: (nh, H, W) attention maps (tensor or array).
        masks: (nh, H, W) bool threshold masks.
        heads: indices of the heads to use (default: the first ``len(palette)``).
        palette: (K, 3) colours in [0, 1]; head ``heads[i]`` gets colour ``i % K``.
    Returns:
        uint8 array (H, W, 3).
    """
    if torch.is_tensor(image):
        image = image.detach().cpu().float().permute(1, 2, 0).numpy()
    image = np.asarray(image, dtype=np.float64)
    maps = maps.detach().cpu().double().numpy() if torch.is_tensor(maps) else np.asarray(maps, np.float64)
    masks = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    if heads is None:
        heads = list(range(min(len(palette), maps.shape[0])))
    grey = image @ np.array([0.299, 0.587, 0.114])
    base = (192.0 + 64.0 * grey) / 256.0 * 0.1
    out = np.repeat(base[..., None], 3, axis=2)
    sel = maps[heads] * masks[heads].astype(np.float64)                  # (k, H, W)
    winner = np.argmax(sel, axis=0)                                      # first max wins ties
    for i in range(len(heads)):
        m = np.where(winner == i, sel[i], 0.0)
        m = minmax(m)
        alpha = np.where(m > value_threshold, np.sqrt(m), 0.0)[..., None]
        out = out * (1 - alpha) + alpha * palette[i % len(palette)]
    return to_uint8(out)


def hstack(panels, pad=2, pad_value=255):
    """Place uint8 (H_i, W_i, 3) panels side by side (top-aligned) with ``pad`` px between them.

    Returns uint8 (max H_i, sum W_i + pad * (n - 1), 3).
    """
    H = max(p.shape[0] for p in panels)
    W = sum(p.shape[1] for p in panels) + pad * (len(panels) - 1)
    out = np.full((H, W, 3), pad_value, dtype=np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + pad
    return out


def image_grid(images, ncol, pad=2, pad_value=0, cell_hw=None, nrow=None):
    """Grid of uint8 (H, W, 3) images, row-major; empty cells stay ``pad_value``.

    Args:
        images: list of uint8 arrays (all of size ``cell_hw`` or of the first image's size).
        ncol: number of columns; rows = max(nrow, ceil(len / ncol), 1).
        cell_hw: (H, W) of a cell, needed when ``images`` may be empty.
    Returns:
        uint8 (rows * H + (rows - 1) * pad, ncol * W + (ncol - 1) * pad, 3).
    """
    if cell_hw is None:
        cell_hw = images[0].shape[:2]
    ch, cw = cell_hw
    rows = max(1, nrow or 0, math.ceil(len(images) / ncol))
    out = np.full((rows * ch + (rows - 1) * pad, ncol * cw + (ncol - 1) * pad, 3), pad_value, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, ncol)
        y, x = r * (ch + pad), c * (cw + pad)
        out[y:y + im.shape[0], x:x + im.shape[1]] = im[:ch, :cw]
    return out


def save_image(array, path, quality=95):
    """Write a uint8 (H, W, 3) array (or (H, W, 4) RGBA) to ``path`` (format from the extension).

    Creates the parent folder. Returns ``path``.
    """
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(array))
    if os.fspath(path).lower().endswith((".jpg", ".jpeg")):
        img.convert("RGB").save(path, quality=quality)
    else:
        img.save(path)
    return path


def draw_correspondences(left, right, points_left, points_right, color=(255, 0, 0), width=1, gap=0):
    """Two images side by side with lines joining matching points.

    Args:
        left, right: uint8 (H, W, 3) arrays of the same height.
        points_left, points_right: (K, 2) sequences of (x, y) pixel coordinates in each image.
        gap: blank pixels between the two images.
    Returns:
        uint8 (H, W_left + gap + W_right, 3).
    """
    canvas = hstack([left, right], pad=gap)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    off = left.shape[1] + gap
    for (x1, y1), (x2, y2) in zip(points_left, points_right):
        draw.line([(float(x1), float(y1)), (float(x2) + off, float(y2))], fill=tuple(color), width=width)
    return np.asarray(img)


def overlay_patch_mask(image, mask, patch_size, color=(255, 64, 0), alpha=0.55):
    """Show a patch mask over an image: masked patches tinted with ``color``, grid lines drawn.

    Args:
        image: uint8 (H, W, 3).
        mask: (h, w) bool array; patch (r, c) covers pixels [r*p, (r+1)*p) x [c*p, (c+1)*p).
        alpha: tint strength on masked patches (unmasked patches keep their colours).
    Returns:
        uint8 (H, W, 3).
    """
    mask = np.asarray(mask, dtype=bool)
    big = np.kron(mask, np.ones((patch_size, patch_size), dtype=bool))
    H, W = image.shape[:2]
    full = np.zeros((H, W), dtype=bool)
    full[:min(H, big.shape[0]), :min(W, big.shape[1])] = big[:H, :W]
    out = image.astype(np.float64)
    tint = np.asarray(color, dtype=np.float64)
    out[full] = out[full] * (1 - alpha) + tint * alpha
    out[::patch_size, :] = out[::patch_size, :] * 0.7
    out[:, ::patch_size] = out[:, ::patch_size] * 0.7
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def paste_box(image, x0, y0, size, rgba=(200, 100, 0, 127)):
    """Alpha-blend a filled square ``[x0, x0+size) x [y0, y0+size)`` of colour ``rgba`` (uint8 RGBA)
    onto uint8 (H, W, 3) ``image``; returns a new uint8 (H, W, 3) array."""
    base = Image.fromarray(image).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle([x0, y0, x0 + size - 1, y0 + size - 1], fill=tuple(rgba))
    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def patch_window_crop(image, row, col, patch_size, window):
    """Crop ``window`` x ``window`` patches centred on patch (row, col), zero-padded past the border.

    Args:
        image: uint8 (H, W, 3).
        row, col: patch coordinates; window: odd number of patches per side.
    Returns:
        uint8 (window * p, window * p, 3).
    """
    half = window // 2
    size = window * patch_size
    y0, x0 = (row - half) * patch_size, (col - half) * patch_size
    out = np.zeros((size, size, 3), dtype=np.uint8)
    H, W = image.shape[:2]
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(H, y0 + size), min(W, x0 + size)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = image[ys:ye, xs:xe]
    return out
