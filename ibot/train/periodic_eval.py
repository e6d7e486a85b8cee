"""Periodic k-NN evaluation during pre-training (``--eval_every N``).

Every N epochs (and after the last epoch) the frozen [CLS] features of the teacher's and/or the
student's backbone are evaluated with the k-NN protocol of ``evaluation/eval_knn.py`` — the same code:
:func:`ibot.eval.knn.build_knn_loaders` (official evaluation transform, ``--eval_resize_size`` /
``--eval_crop_size``) and :func:`ibot.knn.run_knn` (weighted vote, ``--eval_nb_knn``,
``--eval_temperature``) on ``--eval_data_path`` (a folder with ``train/`` and ``val/``).

Distributed runs: every rank must call :meth:`PeriodicKNN.__call__` at the same epochs (the trainer
does); the loaders then shard both splits with a ``DistributedSampler`` and the features are
all-gathered exactly as in ``eval_knn.py``, so each rank gets the same accuracies. The global RNG
states (Python, NumPy, torch) are saved before and restored after the evaluation, so that turning it
on does not change the training run (and exact resume still holds). With ``--eval_every 0`` (default)
nothing is built and nothing runs.

Logged keys (percent), for the first k of ``--eval_nb_knn``: ``knn_top1_<key>``, ``knn_top5_<key>``;
for every further k: ``knn<k>_top1_<key>``, ``knn<k>_top5_<key>`` (``<key>`` = teacher or student).
"""
import os
import time

import torch

from ibot.train.faults import capture_rng_state, restore_rng_state

__all__ = ["PeriodicKNN", "should_evaluate", "knn_log_keys", "check_eval_args"]


def should_evaluate(epoch, args):
    """True when the k-NN runs after epoch ``epoch`` (0-based): every ``eval_every`` epochs and after
    the last epoch; never when ``eval_every`` is 0."""
    every = int(args.eval_every or 0)
    if every <= 0:
        return False
    return (epoch + 1) % every == 0 or epoch + 1 == args.epochs


def knn_log_keys(results, key, nb_knn):
    """``{k: {top1, top5}}`` of one backbone -> flat log entries (see module docstring)."""
    out = {}
    for i, k in enumerate(nb_knn):
        prefix = "knn" if i == 0 else f"knn{int(k)}"
        out[f"{prefix}_top1_{key}"] = results[int(k)]["top1"]
        out[f"{prefix}_top5_{key}"] = results[int(k)]["top5"]
    return out


def check_eval_args(args):
    """Messages for unusable ``--eval_*`` flags (empty when ``--eval_every`` is 0)."""
    errors = []
    every = args.eval_every
    if every < 0:
        errors.append(f"--eval_every must be >= 0 (got {every})")
    if every <= 0:
        return errors
    path = args.eval_data_path or ""
    if not path:
        errors.append("--eval_every needs --eval_data_path (a folder with train/ and val/ class folders)")
    else:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(path, split)):
                errors.append(f"--eval_data_path {path!r} has no {split}/ folder")
    keys = [k for k in str(args.eval_keys).split(",") if k]
    if not keys or any(k not in ("teacher", "student") for k in keys):
        errors.append(f"--eval_keys must be teacher, student or teacher,student (got {args.eval_keys!r})")
    if not args.eval_nb_knn or any(k < 1 for k in args.eval_nb_knn):
        errors.append(f"--eval_nb_knn needs positive values (got {args.eval_nb_knn})")
    return errors


class PeriodicKNN:
    """k-NN of the pre-training backbones on a labelled folder; loaders are built once (lazily)."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.keys = [k for k in str(args.eval_keys).split(",") if k]
        self.nb_knn = [int(k) for k in args.eval_nb_knn]
        self._loaders = None

    def loaders(self):
        if self._loaders is None:
            from ibot.eval.knn import build_knn_loaders
            a = self.args
            self._loaders = build_knn_loaders(a.eval_data_path, a.eval_resize_size, a.eval_crop_size,
                                              a.eval_batch_size, a.eval_num_workers)
        return self._loaders

    @torch.no_grad()
    def __call__(self, backbones):
        """``backbones``: ``{key: module}`` (unwrapped backbones). Returns the flat log entries plus
        ``knn_time`` (seconds)."""
        from ibot.eval.knn import run_knn
        a = self.args
        state = capture_rng_state()
        start = time.time()
        try:
            train_loader, val_loader = self.loaders()
            use_cuda = self.device.type == "cuda"
            out = {}
            for key in self.keys:
                results = run_knn(backbones[key], train_loader, val_loader, self.nb_knn, a.eval_temperature,
                                  n_last_blocks=1, avgpool_patchtokens=0, use_cuda=use_cuda, device=self.device,
                                  verbose=False)
                out.update(knn_log_keys(results, key, self.nb_knn))
        finally:
            restore_rng_state(state)
        out["knn_time"] = time.time() - start
        return out
