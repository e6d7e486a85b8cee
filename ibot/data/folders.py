"""Image-folder data sets of iBOT pre-training (specification section 4).

:class:`ImageFolderMask` returns ``(crops, target, masks)`` like the official ``loader.py``, with
these additions (defaults = official behaviour):

* a root that holds images directly (no class sub-folders) is accepted: every target is ``-1`` and
  ``has_labels`` is ``False``;
* every image is converted to RGB (grayscale, palette, RGBA, CMYK, ...);
* ``mask_crops=k``: masks are computed only for the first ``k`` crops and ``masks`` has length ``k``
  (the trainer passes the number of global crops; the official code masks every crop, Q7);
* ``seed=s``: the Python / NumPy / torch RNG state used for a sample is derived from
  ``(s, epoch, index)``, so crops and masks do not depend on the number of DataLoader workers and
  repeat exactly after a resume. The caller's global RNG state is restored afterwards;
* ``skip_bad_images=True``: an unreadable file is replaced by the next readable sample (index + 1,
  + 2, ... modulo the length), counted in ``num_bad_images`` / ``bad_images`` (per process: every
  DataLoader worker has its own copy) and named in a log warning. Default: raise
  :class:`BadImageError` naming the file. :meth:`skipped_this_epoch` sums the skips of the current
  epoch over the main process and every DataLoader worker (a shared-memory counter, one slot per
  worker, zeroed by ``set_epoch``);
* decompression bombs: an image whose header declares more than ``PIL.Image.MAX_IMAGE_PIXELS``
  pixels (PIL's default, 89,478,485 ≈ 9459², kept) is a :class:`BadImageError` (PIL itself only
  warns up to twice that limit), before any pixel is decoded.

``set_epoch`` must reach the workers: keep DataLoader workers non-persistent (they are re-created,
with a fresh copy of the data set, every epoch), otherwise ``pred_start_epoch`` gating and the
per-epoch seeding see a stale epoch.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ibot.data.masking import DEFAULT_ASPECT_RATIO, MaskGenerator

__all__ = ["BadImageError", "rgb_loader", "ImageFolderInstance", "ImageFolderMask", "sample_seed"]

logger = logging.getLogger(__name__)


class BadImageError(OSError):
    """An image file could not be read or decoded (message names the file)."""


def rgb_loader(path: str) -> Image.Image:
    """Open ``path`` with PIL and return a fully loaded RGB image (any source mode). Images above
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels raise ``DecompressionBombWarning`` as an error."""
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(f)
        if img.mode == "RGB":
            img.load()
            return img
        if img.mode == "P" and "transparency" in img.info:
            # going through RGBA gives the same colours and avoids PIL's palette warning
            img = img.convert("RGBA")
        return img.convert("RGB")


def sample_seed(seed: int, epoch: int, index: int) -> np.ndarray:
    """Hash ``(seed, epoch, index)`` into 4 independent uint32 words (NumPy ``SeedSequence``)."""
    return np.random.SeedSequence([int(seed) % (1 << 64), int(epoch), int(index)]).generate_state(
        4, dtype=np.uint32)


class _SeededSample:
    """Context manager: reseed global ``random`` / NumPy / torch(CPU) RNGs for one sample, restore after.

    ``__enter__`` returns a private :class:`random.Random` for mask generation.
    """

    def __init__(self, seed: int, epoch: int, index: int):
        self.words = sample_seed(seed, epoch, index)

    def __enter__(self) -> random.Random:
        w = [int(x) for x in self.words]
        self._py = random.getstate()
        self._np = np.random.get_state()
        self._torch = torch.default_generator.get_state()
        random.seed((w[0] << 32) | w[1])
        np.random.seed(w[2])
        # only the CPU generator (torch.manual_seed would also reseed CUDA generators)
        torch.default_generator.manual_seed((w[1] << 32) | w[0])
        return random.Random((w[3] << 32) | w[2])

    def __exit__(self, *exc) -> None:
        random.setstate(self._py)
        np.random.set_state(self._np)
        torch.default_generator.set_state(self._torch)


_SKIP_SLOTS = 1024


def _skip_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (_SKIP_SLOTS - 1)


class _ImageFolderBase(ImageFolder):
    """``ImageFolder`` + flat folders, RGB loading, clear errors and optional bad-image skipping."""

    def __init__(self, root, transform: Optional[Callable] = None, *,
                 skip_bad_images: bool = False, loader: Callable[[str], Any] = rgb_loader,
                 **kwargs):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"image folder {root!r} does not exist or is not a directory (check --data_path)")
        self.has_labels = True
        self.skip_bad_images = bool(skip_bad_images)
        self.num_bad_images = 0
        self.bad_images: set = set()
        # skips of the current epoch: slot 0 the main process, slot 1 + id each DataLoader worker
        self._skips = torch.zeros(_SKIP_SLOTS, dtype=torch.int64).share_memory_()
        super().__init__(root, transform=transform, loader=loader, **kwargs)

    # -- folder scanning ---------------------------------------------------------------------------
    def find_classes(self, directory) -> Tuple[List[str], Dict[str, int]]:
        """Class sub-folders (sorted) -> indices; ``([], {})`` for a flat folder of images."""
        entries = list(os.scandir(directory))
        class_dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if class_dirs:
            self.has_labels = True
            return class_dirs, {c: i for i, c in enumerate(class_dirs)}
        self.has_labels = False
        return [], {}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        """List ``(path, target)``; flat folders give target ``-1``. Empty -> ``ValueError``."""
        if self.has_labels:
            samples = super().make_dataset(directory, class_to_idx, extensions=extensions,
                                           is_valid_file=is_valid_file, allow_empty=True)
            if not samples:
                raise ValueError(
                    f"image folder {directory!r} (--data_path) contains no images in its class "
                    f"sub-folders {list(class_to_idx)[:5]}{'...' if len(class_to_idx) > 5 else ''}")
            if not allow_empty:
                found = {t for _, t in samples}
                empty = [c for c, i in class_to_idx.items() if i not in found]
                if empty:
                    raise ValueError(
                        f"class folder(s) {empty[:5]} of {directory!r} (--data_path) contain no "
                        f"images (pass allow_empty=True to accept empty classes)")
            return samples
        if is_valid_file is None:
            exts = extensions if extensions is not None else IMG_EXTENSIONS

            def is_valid_file(p):  # noqa: E306
                return has_file_allowed_extension(p, exts)
        samples = []
        for e in sorted(os.scandir(directory), key=lambda e: e.name):
            if e.is_file() and is_valid_file(e.path):
                samples.append((e.path, -1))
        if not samples:
            raise ValueError(
                f"image folder {directory!r} (--data_path) is empty: no class sub-folders and no "
                f"image files ({', '.join(IMG_EXTENSIONS)})")
        return samples

    # -- loading -----------------------------------------------------------------------------------
    def _read(self, index: int) -> Tuple[Image.Image, int]:
        path, target = self.samples[index]
        try:
            return self.loader(path), target
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
            raise BadImageError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e

    def load_image(self, index: int) -> Tuple[Image.Image, int]:
        """Return ``(PIL RGB image, target)`` of sample ``index`` (applies the bad-image policy)."""
        if not self.skip_bad_images:
            return self._read(index)
        n = len(self.samples)
        for k in range(n):
            j = (index + k) % n
            path = self.samples[j][0]
            if path in self.bad_images:
                continue
            try:
                return self._read(j)
            except BadImageError as e:
                self.bad_images.add(path)
                self.num_bad_images += 1
                self._skips[_skip_slot()] += 1
                logger.warning("skipping unreadable image %s (%d skipped so far in this process): %s",
                               path, self.num_bad_images, e.__cause__)
        raise BadImageError(f"no readable image in {self.root!r} (--data_path)")

    def skipped_this_epoch(self) -> int:
        """Unreadable files skipped since the last ``set_epoch``, by this process and all its workers."""
        return int(self._skips.sum())

    def reset_skip_count(self) -> None:
        """Zero the counter of :meth:`skipped_this_epoch` (call before the epoch's workers start)."""
        self._skips.zero_()

    def _target(self, target):
        return self.target_transform(target) if self.target_transform is not None else target


class ImageFolderInstance(_ImageFolderBase):
    """``__getitem__(index) -> (img, target, index)``; img = transform(PIL RGB image).

    Unused by pre-training (kept for compatibility with the official ``loader.py``).
    """

    def __getitem__(self, index: int):
        img, target = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self._target(target), index


class ImageFolderMask(_ImageFolderBase):
    """Pre-training data set: ``__getitem__(index) -> (crops, target, masks)``.

    * ``crops``: the transform's output (list of ``(3, h, w)`` float tensors for
      :class:`~ibot.augment.DataAugmentationiBOT`).
    * ``target``: class index (int); ``-1`` for a flat folder (``has_labels=False``).
    * ``masks``: list of NumPy bool arrays ``(h // patch_size, w // patch_size)``, one per tensor crop
      in crop order (non-tensor items are skipped, as in the official code); with
      ``mask_crops=k`` only the first ``k`` crops get one, so ``len(masks) == k`` (default ``None``:
      every crop, official). After default collation: list of ``(B, H, W)`` bool tensors.
    * a transform with ``returns_params = True``
      (:class:`~ibot.data.fast_augment.DeviceMultiCrop`) returns ``(crops, params)``; the sample is
      then ``(crops, target, masks, params)``, ``params`` a ``(n_crops, NUM_PARAMS)`` float tensor.

    ``patch_size``: mask cell in pixels (the trainer passes ``8 * patch_size`` for Swin).
    ``pred_ratio`` / ``pred_ratio_var``: scalars or lists (see :mod:`ibot.data.masking`; 1-element lists
    collapse, a scalar var broadcasts). ``pred_aspect_ratio``: (min, max) block aspect ratio.
    ``pred_shape``: ``'block'`` or ``'rand'``. Masks are empty while ``epoch < pred_start_epoch``
    (only once :meth:`set_epoch` has been called, as official). ``seed``: see module docstring.
    Extra keyword arguments (``target_transform``, ``loader``, ``is_valid_file``, ``allow_empty``,
    ``skip_bad_images``) go to the folder base class.
    """

    def __init__(self, root, transform: Optional[Callable] = None, *, patch_size: int,
                 pred_ratio, pred_ratio_var, pred_aspect_ratio=DEFAULT_ASPECT_RATIO,
                 pred_shape: str = "block", pred_start_epoch: int = 0,
                 mask_crops: Optional[int] = None, seed: Optional[int] = None, **kwargs):
        self.mask_generator = MaskGenerator(None, pred_ratio, pred_ratio_var,
                                            pred_aspect_ratio=pred_aspect_ratio,
                                            pred_shape=pred_shape)
        if int(patch_size) <= 0:
            raise ValueError(f"patch_size (mask cell in pixels) must be positive, got {patch_size}")
        if mask_crops is not None and int(mask_crops) < 0:
            raise ValueError(f"mask_crops must be >= 0 or None, got {mask_crops}")
        super().__init__(root, transform, **kwargs)
        self.psz = int(patch_size)
        self.pred_ratio = self.mask_generator.pred_ratio
        self.pred_ratio_var = self.mask_generator.pred_ratio_var
        self.pred_aspect_ratio = self.mask_generator.pred_aspect_ratio
        self.log_aspect_ratio = self.mask_generator.log_aspect_ratio
        self.pred_shape = pred_shape
        self.pred_start_epoch = int(pred_start_epoch)
        self.mask_crops = None if mask_crops is None else int(mask_crops)
        self.seed = None if seed is None else int(seed)
        self.epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        """Store the current epoch (gates masking before ``pred_start_epoch``; enters the seed) and zero
        the epoch's skipped-image counter."""
        self.epoch = int(epoch)
        self.reset_skip_count()

    def get_pred_ratio(self, rng=None) -> float:
        """Masking ratio of one crop: 0 before ``pred_start_epoch``, else a draw from ``rng``."""
        if self.epoch is not None and self.epoch < self.pred_start_epoch:
            return 0.0
        return self.mask_generator.sample_ratio(random if rng is None else rng)

    def make_masks(self, crops, rng=None) -> List[np.ndarray]:
        """Masks for the tensor crops of ``crops`` (list, or a single tensor = one crop)."""
        rng = random if rng is None else rng
        items = crops if isinstance(crops, (list, tuple)) else [crops]
        limit = len(items) if self.mask_crops is None else min(self.mask_crops, len(items))
        masks = []
        for img in items[:limit]:
            if not isinstance(img, torch.Tensor):
                continue
            grid = (img.shape[-2] // self.psz, img.shape[-1] // self.psz)
            masks.append(self.mask_generator(rng, self.get_pred_ratio(rng), grid))
        return masks

    def _get(self, index: int, rng):
        img, target = self.load_image(index)
        crops = self.transform(img) if self.transform is not None else img
        if getattr(self.transform, "returns_params", False):
            # device augmentation path: (uint8 crops, per-crop colour parameters)
            crops, params = crops
            return crops, self._target(target), self.make_masks(crops, rng), params
        return crops, self._target(target), self.make_masks(crops, rng)

    def __getitem__(self, index: int):
        if self.seed is None:
            return self._get(index, random)
        epoch = 0 if self.epoch is None else self.epoch
        with _SeededSample(self.seed, epoch, index) as rng:
            return self._get(index, rng)
