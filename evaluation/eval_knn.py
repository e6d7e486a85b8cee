"""Weighted k-NN evaluation of a frozen backbone (official ``eval_knn.py``, evaluation.md §2.1).

Usage (one process, CPU or one GPU)::

    python evaluation/eval_knn.py --arch vit_small --patch_size 16 \
        --pretrained_weights work_dirs/run/checkpoint.pth --checkpoint_key teacher \
        --data_path /data/imagenet

Several GPUs: ``torchrun --nproc_per_node N evaluation/eval_knn.py ...`` (each rank extracts a shard
of train and val; features are all-gathered). Small images: ``--resize_size 32 --crop_size 32``.

Output, for every k in ``--nb_knn``: ``<k>-NN classifier result: Top1: <x>, Top5: <y>`` (percent).

Differences from the official script (all deliberate, see evaluation.md §5):
* ``--load_features`` defaults to None; a given folder must hold the four dump files (no silent
  fallback to stale dumps in the current directory);
* the number of classes comes from the data, k is capped at the train-set size, any test-set size
  works (no ⌊M/100⌋ = 0 chunk);
* the val set is sharded across ranks too; CPU runs work (``gloo``), ``--use_cuda false`` keeps the
  feature bank on the CPU;
* ``--resize_size`` / ``--crop_size`` (defaults 256 / 224 as officially hard-coded) and ``--seed``;
* weights are loaded with :func:`ibot.eval.weights.load_pretrained_weights` (safe loading; errors on
  mismatching architectures instead of silently evaluating random weights); an empty
  ``--pretrained_weights`` evaluates the random initialisation (logged warning);
* with a comma list of ``--checkpoint_key`` values, dumps go to ``<dump_features>/<key>/``.
"""
import argparse
import copy
import logging
import os

import torch

from ibot.eval.features import check_image_folder
from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser
from ibot.eval.knn import (FEATURE_FILES, build_knn_loaders, compare_trained_vs_random, key_dump_dir, knn_classifier,
                           knn_for_checkpoint, run_knn)
from ibot.utils.distributed import init_distributed_once, is_dist_avail_and_initialized, shutdown_distributed
from ibot.utils.misc import bool_flag, print_run_header

__all__ = ["get_args_parser", "main", "eval_knn_for_key", "build_knn_loaders", "knn_for_checkpoint",
           "compare_trained_vs_random", "knn_classifier", "run_knn", "FEATURE_FILES"]


def get_args_parser(add_help=True):
    """Official ``eval_knn.py`` flags plus ``--resize_size``, ``--crop_size`` and ``--seed``."""
    p = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet", add_help=add_help,
                                parents=[backbone_parser(), features_parser(n_last_blocks=1),
                                         data_parser(image_sizes=True), launch_parser()])
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="values of k")
    p.add_argument("--temperature", default=0.07, type=float, help="voting temperature T")
    p.add_argument("--use_cuda", default=True, type=bool_flag, help="keep the feature bank on the GPU")
    p.add_argument("--dump_features", default=None, help="folder where to save the L2-normalised features")
    p.add_argument("--load_features", default=None, help="folder holding features dumped by --dump_features")
    p.add_argument("--seed", default=0, type=int, help="seed of the random initialisation")
    return p


def eval_knn_for_key(args, device=None):
    """Run the k-NN protocol for one ``args.checkpoint_key``.

    Returns ``{k: {"top1": float, "top5": float}}`` (percent) for every k in ``args.nb_knn``.
    """
    device = device or getattr(args, "device", None) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return knn_for_checkpoint(
        args.pretrained_weights, args.data_path, arch=args.arch, patch_size=args.patch_size,
        checkpoint_key=args.checkpoint_key, nb_knn=args.nb_knn, temperature=args.temperature,
        resize_size=args.resize_size, crop_size=args.crop_size, batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers, n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
        window_size=args.window_size, seed=args.seed, use_cuda=args.use_cuda, device=device,
        load_features=args.load_features, dump_features=args.dump_features)


def main(args):
    """Evaluate every key of ``args.checkpoint_key`` (comma list). Returns ``{key: {k: {top1, top5}}}``."""
    init_distributed_once(args)
    print_run_header(args)
    if not args.load_features:  # fail before any work if the data is not there
        for split in ("train", "val"):
            check_image_folder(os.path.join(args.data_path, split))
    keys = [k.strip() for k in str(args.checkpoint_key).split(",") if k.strip()] or [None]
    out = {}
    for key in keys:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        a.dump_features = key_dump_dir(args.dump_features, key, keys)
        a.load_features = key_dump_dir(args.load_features, key, keys)
        print(f"==> checkpoint_key: {key}")
        out[key] = eval_knn_for_key(a, device=getattr(args, "device", None))
    if is_dist_avail_and_initialized():
        torch.distributed.barrier()
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
