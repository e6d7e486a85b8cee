"""Tiny data sets in the official layouts of the toolbox evaluations, built from Fashion-MNIST.

For tests and smoke runs only (a few dozen images, 32-96 px); every builder returns what the test
needs to know about the answer (ground truth, expected positives, class counts):

* :func:`build_revisited` — ``<root>/<dataset>/gnd_<dataset>.pkl`` + ``jpg/`` (revisited Oxford/Paris);
* :func:`build_copydays` — ``original/``, ``strong/``, ``jpegqual/<q>/``, ``crops/<c>/``;
* :func:`build_davis` — ``ImageSets/2017/val.txt``, ``JPEGImages/480p/<video>/``, ``Annotations/480p/<video>/``;
* :func:`build_imagenet_c` — ``<corruption>/<severity>/<wnid>/``;
* :func:`build_imagenet_a` — 200 ``<wnid>/`` folders;
* :func:`build_in9` — ``<variation>/val/<class>/`` and ``fg_mask/val/<class>/*.npy``.
"""
import os
import pickle

import numpy as np
from PIL import Image

from ibot.data.fmnist import DEFAULT_SRC, load_split
from ibot.eval.copy_detection import BLOCK_NAMES
from ibot.eval.video_segmentation import imwrite_indexed

__all__ = ["fmnist_rgb", "build_revisited", "build_copydays", "build_davis", "build_imagenet_c",
           "build_imagenet_a", "build_in9", "IN9_CLASS_DIRS"]

IN9_CLASS_DIRS = ("00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
                  "06_musical instrument", "07_primate", "08_fish")


def fmnist_rgb(index, size=32, src=DEFAULT_SRC, _cache={}):
    """Fashion-MNIST test image ``index`` as an RGB PIL image of ``size`` (int or (w, h)), tinted by its
    index so that different images differ in colour too."""
    if src not in _cache:
        _cache[src] = load_split("val", src)[0]
    img = _cache[src][index % len(_cache[src])].astype(np.float32) / 255.0
    tint = np.array([0.4 + 0.6 * ((index * 37) % 11) / 10, 0.4 + 0.6 * ((index * 17) % 7) / 6, 1.0])
    rgb = (np.stack([img] * 3, axis=-1) * tint * 255).astype(np.uint8)
    wh = (size, size) if isinstance(size, int) else tuple(size)
    return Image.fromarray(rgb).resize(wh, Image.BICUBIC)


def _save(img, path, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)


def build_revisited(root, dataset="roxford5k", size=(56, 40)):
    """6 database images and 2 queries. Query 0 is an exact copy of database images 0 (easy) and 3
    (hard), with junk {1}; query 1 is a copy of database image 5 (easy only). Any deterministic
    network therefore scores mAP 100 (Medium and Hard). Returns the ground-truth dict."""
    folder = os.path.join(root, dataset, "jpg")
    db = [fmnist_rgb(i, size) for i in (0, 1, 2, 0, 4, 5)]
    names = [f"db_{i}" for i in range(6)]
    for img, n in zip(db, names):           # same image + same encoder settings = identical files
        _save(img, os.path.join(folder, n + ".jpg"), quality=95)
    for q, src in (("query_0", 0), ("query_1", 5)):
        _save(fmnist_rgb(src, size), os.path.join(folder, q + ".jpg"), quality=95)
    gnd = [{"easy": np.array([0]), "hard": np.array([3]), "junk": np.array([1]), "bbx": [0.0, 0.0, 10.0, 10.0]},
           {"easy": [5], "hard": [], "junk": [], "bbx": None}]
    cfg = {"imlist": names, "qimlist": ["query_0", "query_1"], "gnd": gnd}
    with open(os.path.join(root, dataset, f"gnd_{dataset}.pkl"), "wb") as f:
        pickle.dump(cfg, f, protocol=2)
    return cfg


def build_copydays(root, n_originals=3, size=48):
    """``n_originals`` originals named ``20<j>000.jpg``; ``strong/`` holds a flipped copy of every original
    plus a second one of original 1 (so query 2 of ``strong`` has original 1 as positive);
    ``jpegqual/<q>/`` re-encodes every original at quality q, ``crops/<c>/`` crops c % of the area
    away and resizes back. Returns ``{"originals": names, "strong": names}``."""
    originals = [f"20{j}000.jpg" for j in range(n_originals)]
    imgs = [fmnist_rgb(10 + j, size) for j in range(n_originals)]
    for n, im in zip(originals, imgs):
        _save(im, os.path.join(root, "original", n), quality=95)
    strong = []
    for j, im in enumerate(imgs):
        strong.append(f"20{j}001.jpg")
        _save(im.transpose(Image.FLIP_LEFT_RIGHT), os.path.join(root, "strong", strong[-1]), quality=90)
    strong.append("201002.jpg")
    _save(imgs[1].rotate(10), os.path.join(root, "strong", strong[-1]), quality=90)
    for block in BLOCK_NAMES[2:]:
        kind, value = block.split("/")
        for n, im in zip(originals, imgs):
            if kind == "jpegqual":
                _save(im, os.path.join(root, block, n), quality=int(value))
            else:
                keep = (1 - int(value) / 100) ** 0.5
                w = max(4, int(size * keep))
                off = (size - w) // 2
                _save(im.crop((off, off, off + w, off + w)).resize((size, size)), os.path.join(root, block, n),
                      quality=95)
    return {"originals": sorted(originals), "strong": sorted(strong)}


def build_davis(root, video="fmnist", n_frames=4, size=(96, 64), shift=8):
    """One video: two Fashion-MNIST items (objects 1 and 2) on a dark background, object 1 moving
    ``shift`` px right per frame; all frames annotated. Returns the (T, H, W) label arrays."""
    w, h = size
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write(video + "\n")
    obj = [np.asarray(fmnist_rgb(i, 24)).astype(np.float32) for i in (1, 7)]
    masks = [o.mean(axis=-1) > 40 for o in obj]
    labels = []
    rng = np.random.default_rng(0)
    for t in range(n_frames):
        frame = rng.uniform(0, 30, size=(h, w, 3)).astype(np.float32)
        lab = np.zeros((h, w), np.uint8)
        for k, (o, m, (y, x)) in enumerate(zip(obj, masks, ((8, 8 + shift * t), (32, 60)))):
            region = frame[y:y + 24, x:x + 24]
            region[m] = o[m]
            lab[y:y + 24, x:x + 24][m] = k + 1
        name = f"{t:05d}"
        _save(Image.fromarray(frame.astype(np.uint8)), os.path.join(root, "JPEGImages", "480p", video, name + ".jpg"),
              quality=95)
        imwrite_indexed(os.path.join(root, "Annotations", "480p", video, name + ".png"), lab)
        labels.append(lab)
    return np.stack(labels)


def build_imagenet_c(root, corruptions, wnids=("n01440764", "n01443537"), size=32):
    """For every corruption and severity s (1..5): s images of ``wnids[0]`` and one of ``wnids[1]``
    (a classifier always answering class 0 then errs 1/(s+1) at severity s)."""
    for c in corruptions:
        for s in range(1, 6):
            for k, wnid in enumerate(wnids):
                for i in range(s if k == 0 else 1):
                    _save(fmnist_rgb(s * 10 + i + k, size), os.path.join(root, c, str(s), wnid, f"{i}.JPEG"))


def build_imagenet_a(root, n_classes=200, size=32):
    """``n_classes`` wnid folders (sorted order = ImageNet-A class order), one image each."""
    for k in range(n_classes):
        _save(fmnist_rgb(k, size), os.path.join(root, f"n{k:08d}", "0.JPEG"))


def build_in9(root, variations, size=32, extra_class0=("mixed_same",)):
    """IN-9 layout: every variation gets one image per class (two for class 0 in ``extra_class0``);
    ``fg_mask/val/<class>/<name>.npy`` (a centre square) for each ``original/val`` image."""
    for v in variations:
        for k, cls in enumerate(IN9_CLASS_DIRS):
            n = 2 if (k == 0 and v in extra_class0) else 1
            for i in range(n):
                _save(fmnist_rgb(100 + 9 * i + k, size), os.path.join(root, v, "val", cls, f"img_{k}_{i}.JPEG"))
    for k, cls in enumerate(IN9_CLASS_DIRS):
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
        os.makedirs(os.path.join(root, "fg_mask", "val", cls), exist_ok=True)
        np.save(os.path.join(root, "fg_mask", "val", cls, f"img_{k}_0.npy"), mask)
