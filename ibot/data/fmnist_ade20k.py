"""A small semantic-segmentation set in the ADE20K layout, built from Fashion-MNIST garments.

Each canvas (default 64 x 96 px) is a grid of 32-px cells on a dark, slightly noisy grey background;
each cell holds, with probability 0.75, one garment of a random size (24-32 px) at a random place in
the cell, its grey level used as opacity over white, so that a cell looks like a Fashion-MNIST image
(the 32-px frames the demo's teacher was trained on). Label map (raw, as ADE20K stores it):
2 + k = garment class k (0..9, ``ibot.data.fmnist.CLASS_NAMES``) on the garment's silhouette
(opacity > 0.15, holes filled), 0 = "other" on its faint rim (opacity 0.03-0.15, left unlabelled as
ADE20K leaves pixels it cannot name), 1 = background. With ``reduce_zero_label`` that gives 11
classes (background, then the 10 garments) and the rim is ignored. Training canvases use garments of
the Fashion-MNIST training split, validation canvases those of the test split.

Layout: ``<out>/ADEChallengeData2016/images/{training,validation}/ADE_{split}_<i:08d>.jpg`` and
``.../annotations/{training,validation}/ADE_{split}_<i:08d>.png``.
"""
import json
import os

import numpy as np
from PIL import Image
from scipy.ndimage import binary_fill_holes

from .fmnist import CLASS_NAMES, DEFAULT_SRC, load_split

__all__ = ["SEG_CLASS_NAMES", "NUM_SEG_CLASSES", "build_fmnist_ade20k", "compose_canvas"]

SEG_CLASS_NAMES = ("background",) + CLASS_NAMES   # after reduce_zero_label
NUM_SEG_CLASSES = len(SEG_CLASS_NAMES)            # 11
_MARKER = ".fmnist_ade20k_complete.json"
_SPLITS = (("train", "training"), ("val", "validation"))


def compose_canvas(garments, classes, rng, canvas=(64, 96), cell=32, sizes=(24, 32)):
    """Paste garments on one canvas, one per ``cell`` x ``cell`` cell of the grid (no overlaps).

    Args:
        garments: uint8 ``(n, 28, 28)`` Fashion-MNIST images, one per cell in row-major order
            (``n = (H // cell) * (W // cell)``); classes: their labels ``(n,)`` (0..9, or -1 for an
            empty cell).
        rng: ``numpy.random.Generator``; canvas: ``(H, W)``; sizes: garment side range in px (<= cell).
    Returns:
        ``(image uint8 (H, W, 3), label uint8 (H, W))`` with the raw labels of the module docstring.
    """
    height, width = canvas
    base = float(rng.integers(0, 30))
    image = np.clip(base + rng.normal(0, 3, size=(height, width)), 0, 255).astype(np.float32)
    label = np.ones((height, width), np.uint8)
    cells = [(r * cell, c * cell) for r in range(height // cell) for c in range(width // cell)]
    for (cy, cx), garment, cls in zip(cells, garments, classes):
        if cls < 0:
            continue
        side = int(rng.integers(sizes[0], min(sizes[1], cell) + 1))
        alpha = np.asarray(Image.fromarray(garment).resize((side, side), Image.Resampling.BILINEAR),
                           np.float32) / 255.0
        y = cy + int(rng.integers(0, cell - side + 1))
        x = cx + int(rng.integers(0, cell - side + 1))
        region = image[y:y + side, x:x + side]
        image[y:y + side, x:x + side] = region * (1 - alpha) + 255.0 * alpha
        silhouette = binary_fill_holes(alpha > 0.15)
        lab = label[y:y + side, x:x + side]
        lab[(alpha > 0.03) & ~silhouette] = 0
        lab[silhouette] = 2 + int(cls)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), label


def build_fmnist_ade20k(out_dir, num_train=200, num_val=50, canvas=(64, 96), cell=32, fill=0.75, sizes=(24, 32),
                        seed=0, src=DEFAULT_SRC):
    """Write the ADE20K-layout folder under ``out_dir`` (idempotent for the same settings).

    Returns ``{'root': <out_dir>/ADEChallengeData2016, 'num_classes': 11, 'class_names': [...],
    'train': n, 'val': n, 'built': bool}``. A folder built with other settings raises ``ValueError``.
    """
    settings = {"num_train": num_train, "num_val": num_val, "canvas": list(canvas), "cell": cell, "fill": fill,
                "sizes": list(sizes), "seed": seed}
    root = os.path.join(out_dir, "ADEChallengeData2016")
    marker = os.path.join(out_dir, _MARKER)
    info = {"root": root, "num_classes": NUM_SEG_CLASSES, "class_names": list(SEG_CLASS_NAMES),
            "train": num_train, "val": num_val}
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done == settings:
            return {**info, "built": False}
        raise ValueError(f"{out_dir!r} already holds a Fashion-MNIST ADE20K set built with {done}; requested "
                         f"{settings}. Remove it or choose another folder.")
    for (split, folder), count in zip(_SPLITS, (num_train, num_val)):
        images, labels = load_split(split, src)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        img_dir = os.path.join(root, "images", folder)
        ann_dir = os.path.join(root, "annotations", folder)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(count):
            n = (canvas[0] // cell) * (canvas[1] // cell)
            pick = rng.integers(0, len(images), size=n)
            classes = np.where(rng.random(n) < fill, labels[pick].astype(int), -1)
            image, label = compose_canvas(images[pick], classes, rng, canvas, cell, sizes)
            name = f"ADE_{folder[:-3] if folder == 'training' else 'val'}_{i:08d}"
            Image.fromarray(image).save(os.path.join(img_dir, name + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(ann_dir, name + ".png"))
    with open(marker, "w") as f:
        json.dump(settings, f)
    return {**info, "built": True}
