"""Copy detection on Copydays (official ``eval_copy_detection.py``, evaluation.md §2.10).

Usage (run.sh ``copydays_copydet``)::

    python evaluation/eval_copy_detection.py --arch vit_small --pretrained_weights ckpt.pth \
        --checkpoint_key teacher --data_path data/copydays [--whitening_path yfcc20k/] \
        [--distractors_path yfcc10k/] [--use_cuda false]
    torchrun --nproc_per_node N evaluation/eval_copy_detection.py ...

Layout and protocol: :mod:`ibot.eval.copy_detection` (20 query blocks in the official order,
database = ``original/`` + distractors, [CLS] ⊕ GeM-4 descriptor, optional whitening, top-20 cosine
neighbours, Holidays AP). Output: ``eval on <block> mAP=<.3f>`` per block, one ``json:`` line and,
with ``--output_dir``, ``copydays_<key>.json``.

Differences from the official script: ``--whitening_path`` / ``--distractors_path`` default to
empty (= not used) and a given folder that does not exist is an error instead of being skipped
silently; block sizes are taken from the files (the official code hard-codes 157 / 229 and mis-scores
any other copy of the data silently); the mean over all blocks is reported too; CPU runs work.
"""
import argparse
import copy
import json
import logging
import os

import torch

from ibot.eval.copy_detection import (BLOCK_NAMES, TOP_K, CopydaysBlocks, ImageList, block_map, copy_descriptor,
                                      copydays_transform, list_image_paths, rank_top_k, whiten)
from ibot.eval.features import build_backbone, extract_features, make_loader
from ibot.eval.flags import backbone_parser, data_parser, launch_parser
from ibot.eval.weights import load_pretrained_weights
from ibot.utils.distributed import get_rank, init_distributed_once, shutdown_distributed
from ibot.utils.misc import bool_flag, fix_random_seeds, print_run_header

__all__ = ["get_args_parser", "main", "evaluate_key"]


def get_args_parser(add_help=True):
    """Official flags (common ones from :mod:`ibot.eval.flags`) plus ``--output_dir``."""
    p = argparse.ArgumentParser("Copy detection on Copydays", add_help=add_help, parents=[
        backbone_parser(family="vit", window_size=None), data_parser("/path/to/copydays/", batch_size=16),
        launch_parser()])
    p.add_argument("--whitening_path", default="", type=str,
                   help="folder of images for the whitening (paper: 20k random YFCC100M images); '' = none")
    p.add_argument("--distractors_path", default="", type=str,
                   help="folder of distractor images (paper: 10k YFCC100M images); '' = none")
    p.add_argument("--imsize", default=224, type=int, help="square input size")
    p.add_argument("--use_cuda", default=True, type=bool_flag)
    p.add_argument("--output_dir", default="", type=str, help="where to write the JSON results (optional)")
    return p


def _features(model, paths, args, device, what, bank=None):
    loader = make_loader(ImageList(paths, copydays_transform(args.imsize)), args.batch_size_per_gpu, args.num_workers)
    feats, _ = extract_features(model, loader, device=device, bank_device=bank, l2_normalize=False,
                                feature_fn=copy_descriptor, print_freq=10, header=f"{what}:")
    return feats


def evaluate_key(args, data, whitening_files, distractor_files):
    """Per-block mAP (fractions) for one checkpoint key; None on ranks other than 0."""
    # the GPU when there is one; --use_cuda false keeps the features on the CPU (official meaning)
    device = getattr(args, "device", None) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bank = device if args.use_cuda else torch.device("cpu")
    fix_random_seeds(0)    # the same random initialisation on every rank when no weights are given
    model = build_backbone(args.arch, args.patch_size)
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    queries = _features(model, data.query_files(), args, device, "queries", bank)
    print(f"Extraction of queries features done. Shape: {tuple(queries.shape)}")
    database = _features(model, data.files["original"], args, device, "database", bank)
    if distractor_files:
        print(f"Using {len(distractor_files)} distractors...")
        database = torch.cat([database, _features(model, distractor_files, args, device, "distractors", bank)])
    print(f"Extraction of database and distractors features done. Shape: {tuple(database.shape)}")
    if whitening_files:
        print(f"Extracting features of {len(whitening_files)} images of {args.whitening_path} for the whitening.")
        whitening = _features(model, whitening_files, args, device, "whitening", bank)
        database, queries = whiten(database, queries, whitening)
    if get_rank() != 0:
        return None
    _, indices = rank_top_k(database, queries, TOP_K)
    sizes = data.block_sizes
    scores = block_map(indices.cpu(), list(zip(BLOCK_NAMES, sizes)), data.positives)
    for name in BLOCK_NAMES:
        print("eval on %s mAP=%.3f" % (name, scores[name]))
    return scores


def main(argv=None):
    """Evaluate every key of ``--checkpoint_key``; returns ``{key: {block: mAP}}`` (rank 0)."""
    args = get_args_parser().parse_args(argv)
    data = CopydaysBlocks(args.data_path)          # checks the layout before any work
    whitening = list_image_paths(args.whitening_path, "whitening") if args.whitening_path else []
    distractors = list_image_paths(args.distractors_path, "distractor") if args.distractors_path else []
    init_distributed_once(args)
    print_run_header(args)
    out = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()] or [None]:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        print(f"==> checkpoint_key: {key}")
        scores = evaluate_key(a, data, whitening, distractors)
        if scores is None:
            continue
        record = {"checkpoint_key": key, "mAP": scores, "mean_mAP": sum(scores.values()) / len(scores),
                  "block_sizes": dict(zip(BLOCK_NAMES, data.block_sizes)), "whitening": len(whitening),
                  "distractors": len(distractors)}
        print("json: " + json.dumps(record))
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"copydays_{key}.json"), "w") as f:
                json.dump(record, f, indent=1)
        out[key] = scores
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
    shutdown_distributed()
