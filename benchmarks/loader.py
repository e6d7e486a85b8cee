#!/usr/bin/env python
"""Per-core throughput of the pre-training data set: decode, every crop, masks.

Accepts every ``main_ibot.py`` flag (crop numbers, sizes and scales, masking, ``--seed``...) plus:

- ``--paths``: comma-separated data paths to time, alternating in one run (default all):
  ``official`` (the official transform, written out from specification section 5, no per-sample
  seeding, masks for every crop), ``pil`` (our :class:`ibot.data.augment.DataAugmentationiBOT`),
  ``fast`` (:class:`ibot.data.fast_augment.FastMultiCrop`, normalised float crops), ``fast_uint8``
  (the same, uint8 crops: normalisation left to the device), ``device`` (the worker half of the device
  path, :class:`ibot.data.fast_augment.DeviceMultiCrop`: uint8 crops and parameters);
- ``--rounds R`` (default 3): each round runs every path once over the same images, in turn;
- ``--images N``: images per round (default: every image of the folder, at most 64);
- ``--image_folder DIR``: the images (default: ``--data_path`` when given on the command line, else a
  folder built once in ``--photo_cache`` from the photographs that scikit-learn and matplotlib ship,
  cropped to ImageNet sizes and re-encoded as JPEG quality 90);
- ``--loader_workers 4,8,16``: additionally the wall-clock images/s of a ``DataLoader`` with that many
  workers per path (``--loader_batches`` batches of ``--batch_size_per_gpu`` after one warm-up batch).

Runs in one process with one thread (``torch.set_num_threads(1)``, OpenCV one thread), so CPU time
is the cost per core. Prints ONE JSON line: per path ``images_per_s_per_core``, ``cpu_ms_per_image``
and ``stages_ms`` (CPU ms per image by stage: decode, draw, crop_resize(+flip), colour stages,
normalize, masks; ``other`` = the rest: Python, seeding, list building), and ``speedup`` of each path
over ``official``. Example (ViT-S/16 README recipe)::

    python benchmarks/loader.py --local_crops_number 10 --global_crops_scale 0.25 1 \\
        --local_crops_scale 0.05 0.25
"""
import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ibot.data import fast_augment
from ibot.data.augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationiBOT
from ibot.data.fast_augment import DeviceMultiCrop, FastMultiCrop
from ibot.data.folders import ImageFolderMask
from ibot.train.flags import get_args_parser

PATHS = ("official", "pil", "fast", "fast_uint8", "device")
# ImageNet-like (width, height) sizes; every crop must fit its source photograph
LANDSCAPE_SIZES = ((500, 375), (500, 333), (500, 400), (450, 338))
PORTRAIT_SIZES = ((375, 500), (333, 500), (400, 500), (338, 450))


def _source_photographs():
    """The real photographs shipped by scikit-learn (china, flower) and matplotlib (grace_hopper)."""
    import matplotlib
    import sklearn.datasets
    sk = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    mpl = os.path.join(matplotlib.get_data_path(), "sample_data")
    return [os.path.join(sk, "china.jpg"), os.path.join(sk, "flower.jpg"), os.path.join(mpl, "grace_hopper.jpg")]


def build_photo_folder(root, n=48, seed=0, quality=90):
    """Write ``n`` JPEG crops of ImageNet sizes (about 500 x 375) of the shipped photographs to
    ``root`` (flat folder, ``photo_000.jpg`` ...); returns ``root``. Deterministic in ``seed``."""
    os.makedirs(root, exist_ok=True)
    done = os.path.join(root, f".complete_{n}_{seed}_{quality}")
    if os.path.exists(done):
        return root
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in _source_photographs()]
    for k in range(n):
        src = sources[k % len(sources)]
        sizes = [s for s in LANDSCAPE_SIZES + PORTRAIT_SIZES if s[0] <= src.width and s[1] <= src.height]
        w, h = rng.choice(sizes)
        left, top = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
        img = src.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(os.path.join(root, f"photo_{k:03d}.jpg"), "JPEG", quality=quality)
    open(done, "w").close()
    return root


# ------------------------------------------------------------------------------------------------
# The official transform (specification section 5), written out here so that the benchmark times
# the official computation and not ours.
class _OfficialGaussianBlur:
    def __init__(self, p):
        self.prob = p

    def __call__(self, img):
        if not random.random() <= self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _OfficialSolarization:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class OfficialMultiCrop:
    """The official ``DataAugmentationiBOT`` (torchvision v1 transforms on PIL images)."""

    def __init__(self, gscale, lscale, ng, nl, gsize=224, lsize=96):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2)])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = InterpolationMode.BICUBIC
        self.ng, self.nl = ng, nl
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(gsize, scale=gscale, interpolation=bicubic),
            flip_and_color_jitter, _OfficialGaussianBlur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(gsize, scale=gscale, interpolation=bicubic),
            flip_and_color_jitter, _OfficialGaussianBlur(0.1), _OfficialSolarization(0.2), normalize])
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(lsize, scale=lscale, interpolation=bicubic),
            flip_and_color_jitter, _OfficialGaussianBlur(0.5), normalize])

    def __call__(self, image):
        crops = [self.global_transfo1(image)]
        crops += [self.global_transfo2(image) for _ in range(self.ng - 1)]
        crops += [self.local_transfo(image) for _ in range(self.nl)]
        return crops


# ------------------------------------------------------------------------------------------------
class StageClock:
    """Accumulates process CPU time by stage name."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] += time.process_time() - t0
        return timed


_STAGE_OF_TRANSFORM = {
    "RandomResizedCrop": "crop_resize", "RandomHorizontalFlip": "flip", "RandomApply": "color_jitter",
    "RandomGrayscale": "grayscale", "GaussianBlur": "blur", "_OfficialGaussianBlur": "blur",
    "Solarization": "solarize", "_OfficialSolarization": "solarize", "ToTensor": "normalize",
    "Normalize": "normalize"}


class _TimedTransform:
    def __init__(self, fn, name, clock):
        self.call = clock.wrap(name, fn)

    def __call__(self, x):
        return self.call(x)


def _instrument_compose(compose, clock):
    """Wrap every leaf transform of a (nested) torchvision ``Compose`` with a stage timer, in place."""
    for k, t in enumerate(compose.transforms):
        if isinstance(t, transforms.Compose):
            _instrument_compose(t, clock)
        elif not isinstance(t, _TimedTransform):  # shared sub-pipelines are wrapped once
            compose.transforms[k] = _TimedTransform(t, _STAGE_OF_TRANSFORM.get(type(t).__name__, "other_ops"), clock)


@contextlib.contextmanager
def _instrument_fast(clock):
    """Stage timers around the module-level steps of :mod:`ibot.data.fast_augment`."""
    names = {"draw_crop": "draw", "_crop_resize_flip": "crop_resize", "_render_colour": "colour",
             "_normalize_crops": "normalize", "_as_tensor": "to_tensor"}
    saved = {n: getattr(fast_augment, n) for n in names}
    for n, stage in names.items():
        setattr(fast_augment, n, clock.wrap(stage, saved[n]))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(fast_augment, n, fn)


def build_transform(path, args):
    g = (args.global_crops_scale, args.local_crops_scale, args.global_crops_number, args.local_crops_number,
         args.global_crops_size, args.local_crops_size)
    kw = dict(blur_radius_scale=args.blur_radius_scale, color_jitter_scale=args.color_jitter_scale)
    if path == "official":
        return OfficialMultiCrop(tuple(args.global_crops_scale), tuple(args.local_crops_scale), *g[2:])
    if path == "pil":
        return DataAugmentationiBOT(*g, **kw)
    if path == "fast":
        return FastMultiCrop(*g, **kw)
    if path == "fast_uint8":
        return FastMultiCrop(*g, output="uint8", **kw)
    if path == "device":
        return DeviceMultiCrop(*g, **kw)
    raise ValueError(f"unknown path {path!r} (--paths): choose from {', '.join(PATHS)}")


def build_dataset(path, root, args, clock=None):
    """``ImageFolderMask`` of ``path``; with ``clock``, stage timers on decode, transform steps, masks."""
    transform = build_transform(path, args)
    cell = 8 * args.patch_size if "swin" in args.arch else args.patch_size
    official = path == "official"
    ds = ImageFolderMask(root, transform=transform, patch_size=cell, pred_ratio=args.pred_ratio,
                         pred_ratio_var=args.pred_ratio_var, pred_aspect_ratio=(0.3, 1 / 0.3),
                         pred_shape=args.pred_shape, pred_start_epoch=args.pred_start_epoch,
                         mask_crops=None if official else args.global_crops_number,
                         seed=None if official else args.seed)
    ds.set_epoch(0)
    if clock is not None:
        ds.loader = clock.wrap("decode", ds.loader)
        ds.make_masks = clock.wrap("masks", ds.make_masks)
        for name in ("global_transfo1", "global_transfo2", "local_transfo"):
            if hasattr(transform, name):
                _instrument_compose(getattr(transform, name), clock)
    return ds


def time_paths(paths, root, args, n_images, rounds):
    """CPU seconds per path and stage over ``rounds`` alternating rounds of ``n_images`` samples."""
    clocks = {p: StageClock() for p in paths}
    datasets = {p: build_dataset(p, root, args, clocks[p]) for p in paths}
    totals = defaultdict(float)
    for p in paths:  # warm-up (imports, OpenCV, first-call allocations), not timed
        datasets[p][0]
        clocks[p].seconds.clear()
    for r in range(rounds):
        for p in paths:
            ds = datasets[p]
            ctx = _instrument_fast(clocks[p]) if p in ("fast", "fast_uint8", "device") else contextlib.nullcontext()
            with ctx:
                t0 = time.process_time()
                for i in range(n_images):
                    ds[(i + r * n_images) % len(ds)]
                totals[p] += time.process_time() - t0
    out = {}
    n = n_images * rounds
    for p in paths:
        stages = {k: round(v / n * 1e3, 3) for k, v in sorted(clocks[p].seconds.items())}
        stages["other"] = round((totals[p] - sum(clocks[p].seconds.values())) / n * 1e3, 3)
        out[p] = dict(images_per_s_per_core=round(n / totals[p], 2), cpu_ms_per_image=round(totals[p] / n * 1e3, 3),
                      stages_ms=stages)
    return out


def loader_throughput(path, root, args, workers, batches):
    """Wall-clock images/s of a DataLoader with ``workers`` workers (after one warm-up batch)."""
    ds = build_dataset(path, root, args)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0),
                                         persistent_workers=False, prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    done = 0
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        done += args.batch_size_per_gpu
    return round(done / (time.perf_counter() - t0), 2)


def get_parser():
    parser = argparse.ArgumentParser("iBOT data-set throughput", parents=[get_args_parser()])
    parser.add_argument("--paths", default=",".join(PATHS), help=f"Comma-separated subset of {', '.join(PATHS)}.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds (every path once per round).")
    parser.add_argument("--images", type=int, default=None, help="Images per round (default: all, at most 64).")
    parser.add_argument("--image_folder", default=None, help="Folder of images (default: see module docstring).")
    parser.add_argument("--photo_cache", default=os.path.join(tempfile.gettempdir(), "ibot_loader_photos"),
                        help="Where the default photo folder is built (once).")
    parser.add_argument("--loader_workers", default="", help="Comma-separated DataLoader worker counts to time.")
    parser.add_argument("--loader_batches", type=int, default=20, help="Timed batches per worker count.")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_parser().parse_args(argv)
    torch.set_num_threads(1)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            raise SystemExit(f"--paths: unknown path {p!r}; choose from {', '.join(PATHS)}")
    given_data_path = any(a == "--data_path" or a.startswith("--data_path=") for a in argv)
    root = args.image_folder or (args.data_path if given_data_path else build_photo_folder(args.photo_cache))
    if not os.path.isdir(root):
        raise SystemExit(f"--image_folder/--data_path {root!r} is not a directory")
    probe = build_dataset(paths[0], root, args)
    n_images = min(len(probe), args.images or 64)
    sizes = [Image.open(probe.samples[i][0]).size for i in range(min(n_images, len(probe)))]
    result = dict(
        image_folder=root, images_per_round=n_images, rounds=args.rounds,
        mean_image_size=[round(float(np.mean([s[0] for s in sizes]))), round(float(np.mean([s[1] for s in sizes])))],
        global_crops=f"{args.global_crops_number}x{args.global_crops_size}",
        local_crops=f"{args.local_crops_number}x{args.local_crops_size}",
        global_crops_scale=args.global_crops_scale, local_crops_scale=args.local_crops_scale,
        threads=torch.get_num_threads(), torch=torch.__version__)
    result["paths"] = time_paths(paths, root, args, n_images, args.rounds)
    if "official" in result["paths"]:
        base = result["paths"]["official"]["cpu_ms_per_image"]
        result["speedup"] = {p: round(base / v["cpu_ms_per_image"], 3) for p, v in result["paths"].items()}
    if args.loader_workers:
        result["loader_images_per_s"] = {
            p: {int(w): loader_throughput(p, root, args, int(w), args.loader_batches)
                for w in args.loader_workers.split(",")} for p in paths}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
