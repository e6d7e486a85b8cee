"""ADE20K in its official layout, and the iteration-based sampler of the trainer.

Layout (``--data_path`` is ``ADEChallengeData2016`` or the folder holding it)::

    ADEChallengeData2016/images/{training,validation}/<name>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<name>.png

Annotations hold 0 ("other", unlabelled) and the classes 1..C; with ``reduce_zero_label`` (the
ADE20K setting) 0 becomes the ignore index 255 and class k becomes k - 1, as mmseg's
``LoadAnnotations(reduce_zero_label=True)`` does. A value above C raises an error naming the file.
"""
import os

import numpy as np
import torch
from PIL import Image

from .transforms import IGNORE_INDEX

__all__ = ["ADE20K_FOLDER", "SPLITS", "resolve_ade_root", "reduce_zero_label", "ADE20KDataset",
           "IterationSampler", "SegmentationDataError"]

ADE20K_FOLDER = "ADEChallengeData2016"
SPLITS = {"train": "training", "val": "validation"}


class SegmentationDataError(ValueError):
    """The data folder does not have the ADE20K layout, or a label map holds an invalid value."""


def resolve_ade_root(data_path):
    """``data_path`` itself when it holds ``images/`` and ``annotations/``, else ``data_path/ADEChallengeData2016``.

    Raises :class:`SegmentationDataError` naming the expected folders when neither has the layout.
    """
    data_path = os.fspath(data_path)
    for root in (data_path, os.path.join(data_path, ADE20K_FOLDER)):
        if all(os.path.isdir(os.path.join(root, kind, split)) for kind in ("images", "annotations")
               for split in SPLITS.values()):
            return root
    expected = os.path.join(data_path, ADE20K_FOLDER)
    missing = [os.path.join(expected, kind, split) for kind in ("images", "annotations")
               for split in SPLITS.values() if not os.path.isdir(os.path.join(expected, kind, split))]
    raise SegmentationDataError(
        f"--data_path {data_path!r} does not hold the ADE20K layout: expected the folders "
        f"{expected}/images/{{training,validation}} and {expected}/annotations/{{training,validation}} "
        f"(or those four directly under {data_path}); missing: {', '.join(missing)}")


def reduce_zero_label(label):
    """uint8 label map: 0 -> 255 (ignore), k -> k - 1 (mmseg ``reduce_zero_label``)."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


class ADE20KDataset(torch.utils.data.Dataset):
    """One split of an ADE20K-layout folder.

    Args:
        data_path: ``ADEChallengeData2016`` or its parent.
        split: ``'train'`` or ``'val'``.
        num_classes: C (150 for ADE20K); labels must lie in 0..C (raw).
        reduce_zero: apply ``reduce_zero_label``.
        pipeline: train pipeline ``f(img, label, rng) -> (image, label)``; None for the test split,
            where ``__getitem__`` returns the raw ``(img uint8 (H, W, 3), label uint8 (H, W), name)``.
        img_suffix, seg_suffix: file endings (official ``.jpg`` / ``.png``).
    Indexing with ``(index, seed)`` (the :class:`IterationSampler` items) seeds the augmentation.
    """

    def __init__(self, data_path, split="train", num_classes=150, reduce_zero=True, pipeline=None,
                 img_suffix=".jpg", seg_suffix=".png"):
        self.root = resolve_ade_root(data_path)
        self.split, self.num_classes, self.reduce_zero, self.pipeline = split, num_classes, reduce_zero, pipeline
        self.img_dir = os.path.join(self.root, "images", SPLITS[split])
        self.ann_dir = os.path.join(self.root, "annotations", SPLITS[split])
        self.names = sorted(f[:-len(img_suffix)] for f in os.listdir(self.img_dir) if f.endswith(img_suffix))
        if not self.names:
            raise SegmentationDataError(f"no *{img_suffix} images in {self.img_dir}")
        self.img_suffix, self.seg_suffix = img_suffix, seg_suffix
        missing = [n for n in self.names if not os.path.isfile(os.path.join(self.ann_dir, n + seg_suffix))]
        if missing:
            raise SegmentationDataError(f"{len(missing)} images of {self.img_dir} have no annotation in "
                                        f"{self.ann_dir}, e.g. {missing[0]}{seg_suffix}")

    def __len__(self):
        return len(self.names)

    def image_path(self, index):
        return os.path.join(self.img_dir, self.names[index] + self.img_suffix)

    def label_path(self, index):
        return os.path.join(self.ann_dir, self.names[index] + self.seg_suffix)

    def load_label(self, index):
        """The (zero-reduced) label map ``uint8 (H, W)``; raises on values outside 0..C."""
        path = self.label_path(index)
        label = np.array(Image.open(path))
        if label.ndim != 2:
            raise SegmentationDataError(f"{path}: a label map must be a single-channel PNG, got shape {label.shape}")
        top = self.num_classes if self.reduce_zero else self.num_classes - 1
        if int(label.max()) > top:
            bad = sorted(int(v) for v in np.unique(label) if v > top and (self.reduce_zero or v != IGNORE_INDEX))
            if bad:
                allowed = (f"0..{top}, 0 = unlabelled" if self.reduce_zero else f"0..{top} and {IGNORE_INDEX}")
                raise SegmentationDataError(f"{path}: label values {bad} outside the {self.num_classes} classes "
                                            f"(allowed {allowed}); check --num_classes")
        return reduce_zero_label(label) if self.reduce_zero else label.astype(np.uint8)

    def load_image(self, index):
        """RGB ``uint8 (H, W, 3)``; its size must equal the label map's."""
        with Image.open(self.image_path(index)) as im:
            return np.array(im.convert("RGB"))

    def check_labels(self, limit=None):
        """Validate the label maps (all, or the first ``limit``) before training; returns how many were read."""
        count = len(self) if limit is None else min(limit, len(self))
        for i in range(count):
            self.load_label(i)
        return count

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        img, label = self.load_image(index), self.load_label(index)
        if img.shape[:2] != label.shape:
            raise SegmentationDataError(f"{self.image_path(index)} is {img.shape[:2]} but its label map "
                                        f"{self.label_path(index)} is {label.shape}")
        if self.pipeline is None:
            return img, label, self.names[index]
        return self.pipeline(img, label, np.random.default_rng(seed))


class IterationSampler(torch.utils.data.Sampler):
    """``(index, seed)`` items for iterations ``start_iter .. max_iters - 1`` of one rank.

    Global sample position ``g = it * batch * world + rank * batch + b`` picks
    ``perm_e[g mod N]`` with ``perm_e`` the permutation of epoch ``e = g // N`` (seeded by ``seed + e``),
    and seeds its augmentation with ``seed * 1_000_003 + g``: the stream depends only on the position,
    so a resumed run sees the samples and augmentations an uninterrupted run sees.
    """

    def __init__(self, num_samples, batch_size, max_iters, start_iter=0, seed=0, rank=0, world_size=1):
        self.n, self.batch, self.max_iters, self.start = num_samples, batch_size, max_iters, start_iter
        self.seed, self.rank, self.world = seed, rank, world_size
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def __iter__(self):
        for it in range(self.start, self.max_iters):
            for b in range(self.batch):
                g = (it * self.world + self.rank) * self.batch + b
                yield self._perm(g // self.n)[g % self.n], self.seed * 1_000_003 + g

    def __len__(self):
        return (self.max_iters - self.start) * self.batch
