"""A small COCO-format instance-segmentation set built from Fashion-MNIST garments.

Each canvas is a dark, slightly noisy RGB image with a few garments pasted at random scales and
places. A garment's mask is the set of its (rescaled) pixels brighter than ``MASK_LEVEL`` that no
later garment covers; its box is the tight box of that mask, so boxes and masks agree exactly.

Layout (the standard COCO 2017 one, evaluation.md §1.1)::

    <root>/annotations/instances_train2017.json   canvases from the Fashion-MNIST training split
    <root>/annotations/instances_val2017.json     canvases from the test split
    <root>/train2017/<id:06d>.png, <root>/val2017/<id:06d>.png

Categories are the ten Fashion-MNIST classes with COCO ids 1..10. Segmentations are compressed
RLE (``iscrowd`` 0), written with ``pycocotools.mask.encode``. ``empty_every`` canvases hold no
garment (as COCO has images without annotations).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ibot.data.fmnist import CLASS_NAMES, DEFAULT_SRC, load_split

__all__ = ["MASK_LEVEL", "build_fmnist_coco", "render_canvas"]

MASK_LEVEL = 40          # uint8 grey level above which a garment pixel belongs to its mask
_MARKER = ".fmnist_coco_complete.json"


def render_canvas(rng: np.random.Generator, garments, canvas: int, min_size: int, max_size: int,
                  max_overlap: float = 0.3):
    """Paste ``garments`` (list of ``(uint8 (28, 28) image, label)``) on one canvas.

    Args:
        rng: NumPy generator (all randomness comes from it).
        canvas: side of the square canvas in pixels.
        min_size, max_size: range of the pasted garment side in pixels (inclusive).
        max_overlap: a placement whose box IoU with an earlier garment exceeds it is re-drawn
            (up to 20 times, then the garment is skipped).
    Returns:
        (image uint8 (canvas, canvas, 3), list of ``(label, mask bool (canvas, canvas))``); masks
        exclude pixels covered by later garments, and garments left with no pixel are dropped.
    """
    image = rng.integers(0, 24, size=(canvas, canvas), dtype=np.int64).astype(np.float32)
    owner = np.full((canvas, canvas), -1, dtype=np.int64)
    boxes, labels = [], []
    for img28, label in garments:
        for _ in range(20):
            side = int(rng.integers(min_size, max_size + 1))
            x0 = int(rng.integers(0, canvas - side + 1))
            y0 = int(rng.integers(0, canvas - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_box_iou(box, b) <= max_overlap for b in boxes):
                break
        else:
            continue
        patch = np.asarray(Image.fromarray(img28).resize((side, side), Image.Resampling.BILINEAR))
        fg = patch > MASK_LEVEL
        region = image[y0:y0 + side, x0:x0 + side]
        region[fg] = patch[fg]
        owner[y0:y0 + side, x0:x0 + side][fg] = len(labels)
        boxes.append(box)
        labels.append(int(label))
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    rgb = np.clip(image[..., None] * tint, 0, 255).astype(np.uint8)
    instances = [(labels[k], owner == k) for k in range(len(labels))]
    return rgb, [(lab, m) for lab, m in instances if m.any()]


def _box_iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _annotation(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {"id": ann_id, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
            "area": float(mask.sum()), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])],
                             "counts": rle["counts"].decode("ascii")}}


def build_fmnist_coco(root: str, num_train: int = 400, num_val: int = 100, canvas: int = 64,
                      min_size: int = 16, max_size: int = 32, max_objects: int = 3,
                      empty_every: int = 25, seed: int = 0, src: str = DEFAULT_SRC) -> Dict[str, object]:
    """Write the COCO-format Fashion-MNIST set under ``root`` (idempotent for the same settings).

    Args:
        num_train, num_val: canvases per split.
        canvas: canvas side (px); min_size/max_size: garment side range (px);
        max_objects: garments per canvas are drawn uniformly from 1..max_objects;
        empty_every: every ``empty_every``-th canvas (ids 0, k, 2k, ...) gets no garment (0: none);
        seed: seed of the whole build; src: folder of the Fashion-MNIST IDX files.
    Returns:
        ``{'root', 'train': n_images, 'val': n_images, 'train_instances', 'val_instances',
        'built': bool}``; ``built`` is False when a complete set with the same settings was there.
    Raises:
        ValueError for inconsistent sizes, or when ``root`` holds a set built with other settings.
    """
    if not 0 < min_size <= max_size <= canvas:
        raise ValueError(f"need 0 < min_size <= max_size <= canvas, got {min_size}, {max_size}, {canvas}")
    settings = dict(num_train=num_train, num_val=num_val, canvas=canvas, min_size=min_size,
                    max_size=max_size, max_objects=max_objects, empty_every=empty_every, seed=seed)
    marker = os.path.join(root, _MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done["settings"] != settings:
            raise ValueError(f"{root!r} already holds a Fashion-MNIST COCO set built with "
                             f"{done['settings']}; requested {settings}. Choose another folder.")
        return {**done["counts"], "root": root, "built": False}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    categories = [{"id": k + 1, "name": name, "supercategory": "garment"}
                  for k, name in enumerate(CLASS_NAMES)]
    counts = {}
    for split, count, offset in (("train", num_train, 0), ("val", num_val, 1)):
        images28, labels28 = load_split(split, src)
        rng = np.random.default_rng([seed, offset])
        folder = os.path.join(root, f"{split}2017")
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            empty = empty_every > 0 and (image_id - 1) % empty_every == 0
            n = 0 if empty else int(rng.integers(1, max_objects + 1))
            picks = rng.integers(0, len(images28), size=n)
            rgb, instances = render_canvas(rng, [(images28[i], labels28[i]) for i in picks],
                                           canvas, min_size, max_size)
            name = f"{image_id:06d}.png"
            Image.fromarray(rgb).save(os.path.join(folder, name))
            images.append({"id": image_id, "file_name": name, "height": canvas, "width": canvas})
            for label, mask in instances:
                annotations.append(_annotation(mask, label, image_id, len(annotations) + 1))
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump({"info": {"description": "Fashion-MNIST garments on canvases (iBOT tests)"},
                       "images": images, "annotations": annotations, "categories": categories}, f)
        counts[split] = len(images)
        counts[f"{split}_instances"] = len(annotations)
    with open(marker, "w") as f:
        json.dump({"settings": settings, "counts": counts}, f)
    return {**counts, "root": root, "built": True}


def main(argv: Optional[list] = None) -> None:
    """``python -m ibot.data.fmnist_coco ROOT [--num_train N --num_val N --canvas PX ...]``."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    for name, default in (("num_train", 400), ("num_val", 100), ("canvas", 64), ("min_size", 16),
                          ("max_size", 32), ("max_objects", 3), ("empty_every", 25), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--src", default=DEFAULT_SRC)
    args = vars(parser.parse_args(argv))
    print(json.dumps(build_fmnist_coco(args.pop("root"), **args)))


if __name__ == "__main__":
    main()
