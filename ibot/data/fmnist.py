"""Fashion-MNIST (IDX ``.gz`` files) -> ImageFolder tree of RGB PNGs, for small pre-training runs.

Layout: ``<out>/train/<k>_<class>/<idx:05d>.png`` (from the 60k training split) and
``<out>/val/<k>_<class>/<idx:05d>.png`` (from the 10k test split); ``k`` = label 0..9 so that the
sorted folder order reproduces the official label indices, ``idx`` = position in the source split.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_SRC", "CLASS_NAMES", "CLASS_DIRS", "read_idx", "load_split", "build_fmnist_folder"]

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_DIRS = tuple(f"{i}_{n.lower().replace('/', '_').replace(' ', '_').replace('-', '')}"
                   for i, n in enumerate(CLASS_NAMES))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_MARKER = ".fmnist_complete.json"


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes; returns uint8 ``(N,)`` or ``(N, 28, 28)``."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} = {int(np.prod(shape))} bytes, got {arr.size}")
    return arr.reshape(shape)


def _missing_message(path: str) -> str:
    return (f"Fashion-MNIST file {path!r} not found. Install the data set with "
            f"`apt-get install dataset-fashion-mnist` (files under {DEFAULT_SRC}) "
            f"or pass --src <folder with the IDX .gz files>.")


def load_split(split: str, src: str = DEFAULT_SRC) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels uint8 (N,))`` of ``split`` ('train' or 'val')."""
    img_name, lab_name = _FILES[split]
    paths = [os.path.join(src, img_name), os.path.join(src, lab_name)]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(_missing_message(p))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"inconsistent IDX files {paths}: {images.shape} vs {labels.shape}")
    return images, labels


def _select(labels: np.ndarray, per_class: Optional[int]) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class (all if None), in source order."""
    if per_class is None:
        return np.arange(len(labels))
    if per_class < 0:
        raise ValueError(f"per-class count must be >= 0, got {per_class}")
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


def build_fmnist_folder(out_dir: str, size: int = 32, per_class_train: Optional[int] = None,
                        per_class_val: Optional[int] = None, src: str = DEFAULT_SRC,
                        verbose: bool = False) -> Dict[str, object]:
    """Write the ImageFolder tree (RGB PNGs, ``size`` x ``size`` px, bicubic from 28 px).

    ``per_class_train`` / ``per_class_val``: keep the first N images of every class (None = all).
    Idempotent: if ``out_dir`` already holds a complete tree built with the same settings nothing is
    written (``built=False``); a complete tree with other settings raises ``ValueError``.
    Returns ``{'train': n_train, 'val': n_val, 'classes': 10, 'size': size, 'built': bool,
    'out_dir': out_dir}`` (image counts).
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"--size must be positive, got {size}")
    settings = {"size": size, "per_class_train": per_class_train, "per_class_val": per_class_val}
    marker = os.path.join(out_dir, _MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("settings") == settings:
            if all(sum(len(os.listdir(os.path.join(out_dir, s, d))) for d in CLASS_DIRS
                       if os.path.isdir(os.path.join(out_dir, s, d))) == done["counts"][s]
                   for s in ("train", "val")):
                return {**done["counts"], "classes": len(CLASS_DIRS), "size": size,
                        "built": False, "out_dir": out_dir}
        else:
            raise ValueError(
                f"{out_dir!r} already holds a Fashion-MNIST tree built with {done.get('settings')}; "
                f"requested {settings}. Remove it or choose another output folder.")
    counts = {}
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        images, labels = load_split(split, src)
        idx = _select(labels, per_class)
        for d in CLASS_DIRS:
            os.makedirs(os.path.join(out_dir, split, d), exist_ok=True)
        for i in idx:
            img = Image.fromarray(images[i])  # uint8 (28, 28) -> mode L
            if size != img.width:
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            img = img.convert("RGB")
            img.save(os.path.join(out_dir, split, CLASS_DIRS[int(labels[i])], f"{int(i):05d}.png"))
        counts[split] = int(len(idx))
        if verbose:
            print(f"{split}: wrote {len(idx)} images to {os.path.join(out_dir, split)}", flush=True)
    with open(marker, "w") as f:
        json.dump({"settings": settings, "counts": counts}, f)
    return {**counts, "classes": len(CLASS_DIRS), "size": size, "built": True, "out_dir": out_dir}
