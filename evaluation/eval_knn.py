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
* weights are loaded with :func:`ibot.pretrained.load_pretrained_weights` (safe loading; errors on
  mismatching architectures instead of silently evaluating random weights); an empty
  ``--pretrained_weights`` evaluates the random initialisation (logged warning);
* with a comma list of ``--checkpoint_key`` values, dumps go to ``<dump_features>/<key>/``.
"""
import argparse
import copy
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from ibot.utils.checkpoint import safe_load
from ibot.utils.distributed import init_distributed_once, shutdown_distributed
from ibot.eval.features import build_backbone, check_image_folder, eval_transform, image_folder, make_loader
from ibot.eval.knn import knn_classifier, run_knn
from ibot.utils.misc import bool_flag, fix_random_seeds, print_run_header
from ibot.eval.weights import load_pretrained_weights

__all__ = ["get_args_parser", "main", "eval_knn_for_key", "build_knn_loaders", "knn_for_checkpoint",
           "compare_trained_vs_random", "knn_classifier", "run_knn", "FEATURE_FILES"]

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")
ARCHS = ["vit_tiny", "vit_small", "vit_base", "vit_large", "swin_tiny", "swin_small", "swin_base", "swin_large"]


def get_args_parser(add_help=True):
    """Official ``eval_knn.py`` flags plus ``--resize_size``, ``--crop_size`` and ``--seed``."""
    p = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet", add_help=add_help)
    p.add_argument("--n_last_blocks", default=1, type=int, help="blocks whose [CLS] token is concatenated")
    p.add_argument("--avgpool_patchtokens", default=0, choices=[0, 1, 2], type=int,
                   help="0: [CLS] only; 1: mean of patch tokens; 2: [CLS] + mean of patch tokens")
    p.add_argument("--batch_size_per_gpu", default=128, type=int)
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="values of k")
    p.add_argument("--temperature", default=0.07, type=float, help="voting temperature T")
    p.add_argument("--pretrained_weights", default="", type=str, help="checkpoint to evaluate ('' = random init)")
    p.add_argument("--use_cuda", default=True, type=bool_flag, help="keep the feature bank on the GPU")
    p.add_argument("--arch", default="vit_small", type=str, choices=ARCHS)
    p.add_argument("--patch_size", default=16, type=int, help="ViT patch size (Swin: 4)")
    p.add_argument("--window_size", default=7, type=int, help="Swin window size")
    p.add_argument("--checkpoint_key", default="teacher", type=str, help="key(s), comma-separated, e.g. teacher,student")
    p.add_argument("--dump_features", default=None, help="folder where to save the L2-normalised features")
    p.add_argument("--load_features", default=None, help="folder holding features dumped by --dump_features")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--dist_url", default="env://", type=str)
    p.add_argument("--local_rank", "--local-rank", default=0, type=int, help="ignored (torchrun sets LOCAL_RANK)")
    p.add_argument("--data_path", default="/path/to/imagenet/", type=str, help="folder with train/ and val/")
    p.add_argument("--resize_size", default=256, type=int, help="shorter side after (bicubic) resizing")
    p.add_argument("--crop_size", default=224, type=int, help="centre-crop size (also the ViT img_size)")
    p.add_argument("--seed", default=0, type=int, help="seed of the random initialisation")
    return p


def build_knn_loaders(data_path, resize_size=256, crop_size=224, batch_size=128, num_workers=10):
    """Non-shuffling ``(image, label, index)`` loaders over ``data_path/train`` and ``data_path/val``.

    Both folders are checked first (error naming the folder). Sharded with a ``DistributedSampler``
    when a process group is up. Returns ``(train_loader, val_loader)``; images are
    (3, crop_size, crop_size) tensors after the official evaluation transform.
    """
    for split in ("train", "val"):
        check_image_folder(os.path.join(data_path, split))
    tf = eval_transform(resize_size, crop_size)
    train = image_folder(os.path.join(data_path, "train"), tf)
    val = image_folder(os.path.join(data_path, "val"), tf)
    if train.classes != val.classes:
        raise ValueError(f"train/ and val/ of {data_path} have different class folders: "
                         f"{train.classes} vs {val.classes}")
    return (make_loader(train, batch_size, num_workers), make_loader(val, batch_size, num_workers))


def _dump_dir(folder, key, keys):
    return folder if (folder is None or len(keys) == 1) else os.path.join(folder, key)


def _load_features(folder):
    missing = [f for f in FEATURE_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"--load_features {folder}: missing {missing}")
    tensors = [safe_load(os.path.join(folder, f)) for f in FEATURE_FILES]
    print(f"Features loaded from {folder}")
    return tensors[0], tensors[2].long(), tensors[1], tensors[3].long()


def eval_knn_for_key(args, device=None):
    """Run the k-NN protocol for one ``args.checkpoint_key``.

    Returns ``{k: {"top1": float, "top5": float}}`` (percent) for every k in ``args.nb_knn``.
    """
    use_cuda = bool(args.use_cuda) and torch.cuda.is_available()
    device = device or getattr(args, "device", None) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    features = None
    num_classes = None
    if args.load_features:
        features = _load_features(args.load_features)
        num_classes = int(max(features[1].max(), features[3].max())) + 1
        model = train_loader = val_loader = None
    else:
        train_loader, val_loader = build_knn_loaders(args.data_path, args.resize_size, args.crop_size,
                                                     args.batch_size_per_gpu, args.num_workers)
        print(f"Data loaded with {len(train_loader.dataset)} train and {len(val_loader.dataset)} val imgs.")
        fix_random_seeds(getattr(args, "seed", 0))
        model = build_backbone(args.arch, args.patch_size, args.window_size, args.avgpool_patchtokens,
                               img_size=args.crop_size)
        print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
        load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
        model.to(device).eval()
    print("Extracting features..." if features is None else "Using loaded features.")
    results, feats = run_knn(model, train_loader, val_loader, args.nb_knn, args.temperature, args.n_last_blocks,
                             args.avgpool_patchtokens, use_cuda=use_cuda, num_classes=num_classes,
                             device=device, features=features, verbose=False, return_features=True)
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0
    if args.dump_features and features is None and rank0:
        os.makedirs(args.dump_features, exist_ok=True)
        train_f, train_l, test_f, test_l = (t.cpu() for t in feats)
        for name, t in zip(FEATURE_FILES, (train_f, test_f, train_l, test_l)):
            torch.save(t, os.path.join(args.dump_features, name))
        print(f"Features dumped to {args.dump_features}")
    print("Features are ready!\nStart the k-NN classification.")
    for k in args.nb_knn:
        r = results[int(k)]
        print(f"{k}-NN classifier result: Top1: {r['top1']}, Top5: {r['top5']}")
    return results


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
        a.dump_features = _dump_dir(args.dump_features, key, keys)
        a.load_features = _dump_dir(args.load_features, key, keys)
        print(f"==> checkpoint_key: {key}")
        out[key] = eval_knn_for_key(a, device=getattr(args, "device", None))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def knn_for_checkpoint(pretrained_weights, data_path, arch="vit_small", patch_size=16, checkpoint_key="teacher",
                       nb_knn=(20,), temperature=0.07, resize_size=256, crop_size=224, batch_size=128,
                       num_workers=0, n_last_blocks=1, avgpool_patchtokens=0, window_size=7, seed=0,
                       use_cuda=True, device=None):
    """k-NN accuracies of one checkpoint (``''`` = random init), in the current process.

    Returns ``{k: {"top1": float, "top5": float}}`` (percent). Meant for scripts and tests (e.g. the
    trained-vs-random comparison); uses the existing process group, if any.
    """
    args = get_args_parser().parse_args([])
    args.__dict__.update(dict(pretrained_weights=pretrained_weights or "", data_path=data_path, arch=arch,
                              patch_size=patch_size, checkpoint_key=checkpoint_key, nb_knn=list(nb_knn),
                              temperature=temperature, resize_size=resize_size, crop_size=crop_size,
                              batch_size_per_gpu=batch_size, num_workers=num_workers, n_last_blocks=n_last_blocks,
                              avgpool_patchtokens=avgpool_patchtokens, window_size=window_size, seed=seed,
                              use_cuda=use_cuda))
    if device is None:
        device = torch.device("cuda" if (use_cuda and torch.cuda.is_available()) else "cpu")
    return eval_knn_for_key(args, device=device)


def compare_trained_vs_random(pretrained_weights, data_path, k=20, **kwargs):
    """Top-1 k-NN accuracy (percent) of a checkpoint and of the same architecture at random init.

    ``kwargs`` go to :func:`knn_for_checkpoint` (arch, patch_size, checkpoint_key, resize_size,
    crop_size...). Returns ``{"trained": float, "random": float, "gain": trained - random, "k": k}``.
    """
    trained = knn_for_checkpoint(pretrained_weights, data_path, nb_knn=(k,), **kwargs)[k]["top1"]
    random_init = knn_for_checkpoint("", data_path, nb_knn=(k,), **kwargs)[k]["top1"]
    return {"trained": trained, "random": random_init, "gain": trained - random_init, "k": k}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
