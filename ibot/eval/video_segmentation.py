"""Semi-supervised video object segmentation by label propagation (evaluation.md §2.11; DINO protocol).

DAVIS 2017 layout (``--data_path``, official default ``data/davis/DAVIS``)::

    ImageSets/2017/val.txt                  one video name per line
    JPEGImages/480p/<video>/<frame>.jpg     frames, sorted by name
    Annotations/480p/<video>/<frame>.png    indexed PNGs (0 = background, 1..K objects, 255 = void)

For each frame t ≥ 1 the context is frame 0 (its one-hot annotation) plus up to ``n_last_frames``
(7) previous frames (their soft, patch-resolution label maps, FIFO). Affinity
``exp(<f_t, f_s> / temperature)`` (0.1) on L2-normalised last-block patch tokens, restricted to
sources within ±``size_mask_neighborhood`` (12) patches in both axes; per target patch the ``topk``
(5) largest affinities over all context positions are kept (ties with the 5th kept too, as
officially) and normalised to sum 1; the label is the affinity-weighted sum of the source labels.
Output: upsample ×patch (bilinear), per-channel min-max, argmax, nearest resize to the original
size, indexed PNG in the DAVIS palette (:func:`davis_palette`, generated, never downloaded).
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

__all__ = ["DAVIS_MEAN", "DAVIS_STD", "davis_palette", "imwrite_indexed", "target_size", "read_frame", "read_seg",
           "to_one_hot", "restrict_neighborhood", "frame_features", "label_propagation", "norm_mask",
           "segment_video", "read_video_list", "read_frame_list"]

# official colour normalisation of this script: note std[0] = 0.228 (0.229 elsewhere), kept for parity
DAVIS_MEAN = (0.485, 0.456, 0.406)
DAVIS_STD = (0.228, 0.224, 0.225)


def davis_palette(n=256):
    """The DAVIS / PASCAL VOC colour map: (n, 3) uint8, entry i built from the bits of i
    (0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), 4 (0, 0, 128), ...)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def imwrite_indexed(path, array, palette=None):
    """Save a (H, W) uint8 label array as an indexed (mode ``P``) PNG with ``palette`` (default DAVIS)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"an indexed PNG needs a 2-D label array, got shape {array.shape}")
    palette = davis_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    im = Image.fromarray(array.astype(np.uint8), mode="P")
    im.putpalette(palette.reshape(-1).tolist())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path, format="PNG")


def target_size(height, width, scale_size=480, multiple=64):
    """Official frame size: shorter side = ``scale_size``, longer side ⌊scale·long/short / 64⌋·64.

    Returns ``(th, tw)``. (The official code computed the mask size with a mirrored test and gave a
    transposed size for square frames; here frames and masks share this one function.)
    """
    if height > width:
        tw = scale_size
        th = int((scale_size * height / width) // multiple * multiple)
    else:
        th = scale_size
        tw = int((scale_size * width / height) // multiple * multiple)
    if th <= 0 or tw <= 0:
        raise ValueError(f"frame {height}x{width} is too elongated for scale_size {scale_size}")
    return th, tw


def read_frame(path, scale_size=480):
    """Read an RGB frame, resize (bilinear, no antialias: OpenCV's default) to :func:`target_size`,
    scale to [0, 1], normalise with :data:`DAVIS_MEAN` / :data:`DAVIS_STD`.

    Returns ``(frame (3, th, tw) float tensor, original height, original width)``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frame not found: {path}")
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    ori_h, ori_w = arr.shape[:2]
    th, tw = target_size(ori_h, ori_w, scale_size)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    if (th, tw) != (ori_h, ori_w):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    mean = torch.tensor(DAVIS_MEAN).view(3, 1, 1)
    std = torch.tensor(DAVIS_STD).view(3, 1, 1)
    return (x[0] - mean) / std, ori_h, ori_w


def to_one_hot(labels, n_dims=None):
    """(h, w) integer labels -> (1, n_dims, h, w) float one-hot (``n_dims`` = max label + 1 by default)."""
    labels = torch.as_tensor(labels).long()
    n_dims = int(labels.max()) + 1 if n_dims is None else n_dims
    return F.one_hot(labels, n_dims).permute(2, 0, 1).unsqueeze(0).float()


def read_seg(path, patch_size, scale_size=480):
    """First-frame annotation: nearest-resized to the patch grid of :func:`target_size` and one-hot.

    Returns ``(one-hot (1, K+1, th/patch, tw/patch), original label array (H, W) uint8)``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"first-frame annotation not found: {path} (expected Annotations/480p/<video>/"
                                f"<first frame>.png next to JPEGImages/480p/)")
    with Image.open(path) as seg:
        seg.load()
        w, h = seg.size
        th, tw = target_size(h, w, scale_size)
        small = np.array(seg.resize((tw // patch_size, th // patch_size), Image.NEAREST))
        original = np.asarray(seg).copy()
    return to_one_hot(torch.from_numpy(small.astype(np.int64))), original


def restrict_neighborhood(h, w, size, device=None):
    """(h·w, h·w) float mask: 1 where the source patch is within ±``size`` rows and columns of the target."""
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    near = ((r[:, None] - r[None, :]).abs() <= size) & ((c[:, None] - c[None, :]).abs() <= size)
    return near.float()


@torch.no_grad()
def frame_features(model, frame):
    """Last-block normed patch tokens of one frame: ``(features (h·w, D), h, w)`` ([CLS] dropped)."""
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    device = next(model.parameters()).device
    out = model.get_intermediate_layers(frame.unsqueeze(0).to(device), n=1)[0][0, 1:]
    h, w = frame.shape[1] // patch, frame.shape[2] // patch
    if out.shape[0] != h * w:
        raise ValueError(f"the model returned {out.shape[0]} patch tokens for a {h}x{w} grid")
    return out.float(), h, w


def label_propagation(feat_tar, h, w, context_feats, context_segs, topk=5, temperature=0.1, neighborhood=None):
    """Propagate the context labels to the target frame.

    Args:
        feat_tar: (h·w, D) target patch features; context_feats: list of (h·w, D) features.
        context_segs: list of (1, C, h, w) label maps of the context frames (same order).
        topk: affinities kept per target patch (over all context positions).
        neighborhood: optional (h·w, h·w) mask from :func:`restrict_neighborhood` (target x source).
    Returns:
        (1, C, h, w) soft label map of the target.
    """
    tar = F.normalize(feat_tar, dim=1, p=2)                                    # (hw_t, D)
    src = F.normalize(torch.stack(context_feats), dim=2, p=2)                  # (n, hw_s, D)
    aff = torch.exp(torch.einsum("td,nsd->nts", tar, src) / temperature)       # (n, hw_t, hw_s)
    if neighborhood is not None:
        aff = aff * neighborhood.unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, h * w)                               # (n·hw_s, hw_t)
    k = min(topk, aff.shape[0])
    tk_min = torch.topk(aff, k=k, dim=0).values.min(dim=0).values
    aff = torch.where(aff < tk_min, torch.zeros_like(aff), aff)
    aff = aff / aff.sum(dim=0, keepdim=True)
    segs = torch.cat([s.to(aff.device) for s in context_segs])                # (n, C, h, w)
    n, c = segs.shape[:2]
    segs = segs.reshape(n, c, -1).transpose(2, 1).reshape(-1, c).T              # (C, n·hw_s)
    return (segs @ aff).reshape(1, c, h, w)


def norm_mask(mask):
    """Min-max normalise each channel of a (C, H, W) map whose max is > 0 (in place; returns it).

    A channel with max == min (> 0) is left unchanged (the official code divided 0 by 0 there)."""
    for c in range(mask.shape[0]):
        m = mask[c]
        if m.max() > 0:
            m = m - m.min()
            if m.max() > 0:
                mask[c] = m / m.max()
    return mask


def read_video_list(data_path, split_file="ImageSets/2017/val.txt"):
    """Video names listed in ``<data_path>/<split_file>`` (error naming the file when missing/empty)."""
    path = os.path.join(data_path, split_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DAVIS video list not found: {path} (expected the DAVIS 2017 layout "
                                f"ImageSets/2017/val.txt, JPEGImages/480p/<video>/, Annotations/480p/<video>/)")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no video")
    return names


def read_frame_list(video_dir):
    """Sorted ``*.jpg`` frames of a video folder (error when there are none)."""
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"video folder not found: {video_dir}")
    frames = sorted(os.path.join(video_dir, f) for f in os.listdir(video_dir) if f.lower().endswith(".jpg"))
    if not frames:
        raise FileNotFoundError(f"no .jpg frame in {video_dir}")
    return frames


@torch.no_grad()
def segment_video(model, frame_list, first_seg_path, out_dir, patch_size, n_last_frames=7,
                  size_mask_neighborhood=12, topk=5, temperature=0.1, scale_size=480, palette=None,
                  progress=None):
    """Segment one video and write ``<out_dir>/<frame>.png`` for every frame (frame 0: its annotation).

    Returns the list of written PNG paths. ``progress(i, n)`` is called after each frame if given.
    """
    palette = davis_palette() if palette is None else palette
    os.makedirs(out_dir, exist_ok=True)
    first_seg, seg_ori = read_seg(first_seg_path, patch_size, scale_size)
    frame0 = read_frame(frame_list[0], scale_size)[0]
    feat0, h, w = frame_features(model, frame0)
    if first_seg.shape[-2:] != (h, w):
        raise ValueError(f"{first_seg_path}: mask grid {tuple(first_seg.shape[-2:])} != feature grid {(h, w)}")
    first_seg = first_seg.to(feat0.device)
    written = [os.path.join(out_dir, os.path.splitext(os.path.basename(frame_list[0]))[0] + ".png")]
    imwrite_indexed(written[0], seg_ori, palette)
    neighborhood = restrict_neighborhood(h, w, size_mask_neighborhood, feat0.device) \
        if size_mask_neighborhood > 0 else None
    queue = []
    for t in range(1, len(frame_list)):
        frame, ori_h, ori_w = read_frame(frame_list[t], scale_size)
        feat, fh, fw = frame_features(model, frame)
        if (fh, fw) != (h, w):
            raise ValueError(f"{frame_list[t]}: frame size differs from the first frame of the video")
        seg = label_propagation(feat, h, w, [feat0] + [q[0] for q in queue], [first_seg] + [q[1] for q in queue],
                                topk, temperature, neighborhood)
        if n_last_frames > 0:
            if len(queue) == n_last_frames:
                queue.pop(0)
            queue.append((feat, seg))
        up = F.interpolate(seg, scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
        labels = norm_mask(up).argmax(dim=0).to(torch.uint8).cpu().numpy()
        labels = np.array(Image.fromarray(labels).resize((ori_w, ori_h), Image.NEAREST))
        path = os.path.join(out_dir, os.path.splitext(os.path.basename(frame_list[t]))[0] + ".png")
        imwrite_indexed(path, labels, palette)
        written.append(path)
        if progress is not None:
            progress(t, len(frame_list) - 1)
    return written
