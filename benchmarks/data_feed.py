"""The real pre-training data loader as an endless batch source, for ``benchmarks/train_step.py --data``.

The data set is the trainer's (``ibot.train.driver.build_dataset``: ``ImageFolderMask`` with the
``--data_pipeline`` transform and the flags' masking); the DataLoader has ``--num_workers`` persistent
workers (a benchmark runs several "epochs" of a small folder), pinned memory on CUDA, shuffling and
``drop_last``. Each batch is turned into the step's inputs by ``ibot.data.device_augment.prepare_crops``,
as in training, so the device half of ``--data_pipeline device`` is part of the measured loop.
"""
import os
import time

import torch

from ibot.data.device_augment import prepare_crops
from ibot.train import driver


class DataFeed:
    """``next_batch() -> (crops on the device, CPU masks)``; ``wait_s`` = host time spent waiting for data."""

    def __init__(self, args, folder):
        if not os.path.isdir(folder):
            raise SystemExit(f"--data {folder!r} is not a folder of images")
        args.data_path = folder
        self.dataset = driver.build_dataset(args)
        self.dataset.set_epoch(0)
        workers = args.num_workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True, num_workers=workers,
            pin_memory=args.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(args.seed))
        if len(self.loader) == 0:
            raise SystemExit(f"--data {folder!r} holds {len(self.dataset)} images, fewer than one batch")
        self.device = args.device
        self.wait_s = 0.0
        self._it = iter(self.loader)

    def next_batch(self):
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            batch = next(self._it)
        self.wait_s += time.perf_counter() - t0
        crops, _, masks, *params = batch
        return prepare_crops(crops, params[0] if params else None, self.device), masks


def photo_folder(n=256):
    """benchmarks/loader.py's folder of ImageNet-sized JPEG photographs (built once in the temp dir)."""
    import importlib.util
    import tempfile
    spec = importlib.util.spec_from_file_location("bench_loader", os.path.join(os.path.dirname(__file__), "loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_photo_folder(os.path.join(tempfile.gettempdir(), f"ibot_photos_{n}"), n=n)
