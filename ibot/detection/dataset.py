"""COCO 2017 instance data in its standard layout, read with pycocotools as mmdet's ``CocoDataset``.

``<data_path>/annotations/instances_{train,val}2017.json`` and the images under
``<data_path>/{train,val}2017/``. mmdet 2.x rules reproduced:

* classes are the annotation file's categories in increasing id order, labels 0..C-1;
* training drops images without any annotation (``filter_empty_gt``) and images smaller than
  32 px (``min_size``); the validation split keeps every image;
* an annotation is skipped when flagged ``ignore``, when its box does not overlap the image, when
  ``area <= 0`` or its width / height is below 1 px, or when its category is unknown;
* crowd annotations (``iscrowd`` 1) are ignored in training (mmdet ``gt_bboxes_ignore`` with
  ``ignore_iof_thr=-1``, i.e. not used); COCOeval treats them as crowd regions when scoring;
* boxes ``[x, y, w, h]`` become ``(x, y, x + w, y + h)``; masks from polygons or RLE via pycocotools.

Problems are reported before any training: a missing file or folder is named, an annotation file
that does not parse or lacks a key names the key (:class:`CocoFormatError`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

__all__ = ["CocoFormatError", "coco_paths", "check_coco_layout", "load_coco", "CocoInstances", "EpochIndexSampler"]

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")


class CocoFormatError(ValueError):
    """The COCO annotation file is not valid JSON or lacks a required key (named in the message)."""


def coco_paths(data_path: str, split: str) -> Tuple[str, str]:
    """``(annotation file, image folder)`` of ``split`` ('train' or 'val') under ``data_path``."""
    return (os.path.join(data_path, "annotations", f"instances_{split}2017.json"),
            os.path.join(data_path, f"{split}2017"))


def check_coco_layout(data_path: str, splits=("train", "val")) -> None:
    """Raise ``FileNotFoundError`` naming every missing annotation file / image folder."""
    missing = []
    for split in splits:
        ann, img = coco_paths(data_path, split)
        if not os.path.isfile(ann):
            missing.append(ann)
        if not os.path.isdir(img):
            missing.append(img + "/")
    if missing:
        raise FileNotFoundError("COCO data not found: missing " + ", ".join(missing)
                                + f" (expected the COCO 2017 layout under --data_path {data_path})")


def load_coco(ann_file: str) -> COCO:
    """Parse and validate a COCO instances file; returns a pycocotools ``COCO`` (quietly)."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{ann_file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{ann_file}: the top level must be an object with 'images', 'annotations', "
                              f"'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data or not isinstance(data[key], list):
            raise CocoFormatError(f"{ann_file}: missing or non-list key '{key}'")
    for section, keys in (("images", _IMAGE_KEYS), ("annotations", _ANN_KEYS), ("categories", ("id", "name"))):
        for i, entry in enumerate(data[section]):
            for key in keys:
                if not isinstance(entry, dict) or key not in entry:
                    raise CocoFormatError(f"{ann_file}: {section}[{i}] has no key '{key}'")
    if not data["categories"]:
        raise CocoFormatError(f"{ann_file}: 'categories' is empty")
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(f"{ann_file}: annotations[{i}]['image_id'] = {ann['image_id']} is not an image id")
        if ann["category_id"] not in cat_ids:
            raise CocoFormatError(f"{ann_file}: annotations[{i}]['category_id'] = {ann['category_id']} "
                                  f"is not a category id")
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise CocoFormatError(f"{ann_file}: annotations[{i}]['bbox'] must be [x, y, w, h]")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """One COCO split as mmdet's ``CocoDataset`` reads it (see the module docstring).

    ``dataset[(epoch, index)]`` (or ``dataset[index]``, epoch 0) -> ``transform(rng, image, target)``
    with ``rng`` seeded by ``(seed, epoch, index)``, so augmentations do not depend on workers or
    on where a run resumed. ``target`` holds ``boxes``, ``labels``, ``masks`` (if ``with_masks``)
    plus ``image_id`` and ``orig_size`` (h, w) in the returned meta.
    """

    def __init__(self, data_path: str, split: str, transform, train: bool, with_masks: bool = True,
                 seed: int = 0, min_size: int = 32, classes_from: Optional[COCO] = None):
        check_coco_layout(data_path, (split,))
        self.ann_file, self.img_dir = coco_paths(data_path, split)
        self.coco = load_coco(self.ann_file)
        reference = classes_from or self.coco
        self.cat_ids = sorted(reference.getCatIds())
        self.class_names = [reference.cats[c]["name"] for c in self.cat_ids]
        self.cat2label = {c: i for i, c in enumerate(self.cat_ids)}
        self.transform, self.train, self.with_masks, self.seed = transform, train, with_masks, seed
        ids = sorted(self.coco.getImgIds())
        if train:  # mmdet _filter_imgs: drop images without annotations and tiny images
            with_ann = {a["image_id"] for a in self.coco.anns.values()}
            ids = [i for i in ids if i in with_ann
                   and min(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) >= min_size]
        self.img_ids = ids
        if not ids:
            raise ValueError(f"{self.ann_file}: no usable image in the {split} split")

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.img_ids)

    def annotations(self, image_id: int) -> Dict[str, np.ndarray]:
        """Boxes (G, 4) xyxy float32, labels (G,) int64, masks (G, H, W) uint8 of the non-crowd objects."""
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("ignore", False) or ann.get("iscrowd", 0):
                continue
            x1, y1, bw, bh = (float(v) for v in ann["bbox"])
            inter_w = max(0.0, min(x1 + bw, w) - max(x1, 0.0))
            inter_h = max(0.0, min(y1 + bh, h) - max(y1, 0.0))
            if inter_w * inter_h == 0 or ann.get("area", bw * bh) <= 0 or bw < 1 or bh < 1:
                continue
            if ann["category_id"] not in self.cat2label:
                continue
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(self.cat2label[ann["category_id"]])
            if self.with_masks:
                masks.append(self._mask(ann, h, w))
        target = {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
                  "labels": np.array(labels, dtype=np.int64)}
        if self.with_masks:
            target["masks"] = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
        return target

    @staticmethod
    def _mask(ann: dict, h: int, w: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if seg is None:
            raise CocoFormatError(f"annotation {ann.get('id')} has no key 'segmentation' (needed for masks)")
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        with warnings.catch_warnings():  # pycocotools' __array__ predates NumPy 2's copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(np.uint8)

    def load_image(self, image_id: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB of ``image_id``."""
        path = os.path.join(self.img_dir, self.coco.imgs[image_id]["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path} (listed in {self.ann_file})")
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_id = self.img_ids[index]
        image = self.load_image(image_id)
        rng = np.random.default_rng([self.seed, epoch, index])
        img, target, meta = self.transform(rng, image, self.annotations(image_id))
        meta = dict(meta, image_id=image_id, orig_size=image.shape[:2])
        return img, target, meta


class EpochIndexSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for this rank's share of a seeded per-epoch permutation.

    ``shuffle``: permutation by ``torch.Generator().manual_seed(seed + epoch)`` (else in order); the
    list is padded by repetition to a multiple of ``num_replicas`` and rank ``r`` takes every
    ``num_replicas``-th entry from ``r`` (as ``DistributedSampler``). ``start`` skips the first
    entries of this rank's share (a mid-epoch resume); :meth:`set_epoch` resets it.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0
        self.per_rank = -(-size // num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> List[int]:
        """This rank's full list for the current epoch (before ``start`` is applied)."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.num_replicas
        order = (order * (-(-total // len(order))))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices()[self.start:]])

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)
