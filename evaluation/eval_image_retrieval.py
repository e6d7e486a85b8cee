"""Image retrieval on revisited Oxford / Paris (official ``eval_image_retrieval.py``, evaluation.md §2.9).

Usage (run.sh ``paris_oxford_reid`` runs it for rparis6k then roxford5k)::

    python evaluation/eval_image_retrieval.py --arch vit_small --pretrained_weights ckpt.pth \
        --checkpoint_key teacher --data_path data/revisited_paris_oxford --dataset roxford5k \
        --imsize 512 --multiscale 1 [--use_cuda false] [--distractors_path data/revisitop1m/jpg]
    torchrun --nproc_per_node 1 evaluation/eval_image_retrieval.py ...    # as the official launcher

Layout: ``<data_path>/<dataset>/gnd_<dataset>.pkl`` and ``<data_path>/<dataset>/jpg/<name>.jpg``
(read with a restricted unpickler: see :mod:`ibot.eval.retrieval`). Queries are full images; each
image is shrunk so that its longer side is ≤ ``--imsize``; ``--multiscale`` averages the features at
scales 1, 1/√2, 1/2. Output: ``>> <dataset>: mAP M: .., H: ..`` and ``mP@k[1 5 10] M: [..], H: [..]``
(percent), one ``json:`` line, and ``<output_dir>/retrieval_<dataset>_<key>.json`` with ``--output_dir``.

Differences from the official script: no automatic download of DINO weights when the path is not a
file (an empty path evaluates the random initialisation with a warning; a wrong path is an error);
``--distractors_path`` (optional R1M-style folder appended to the database) and ``--output_dir`` are
additions; the ground-truth pickle is read safely; CPU runs work.
"""
import argparse
import copy
import json
import logging
import os

import torch

from ibot.eval.features import build_backbone, extract_features, make_loader
from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser
from ibot.eval.retrieval import (DATASETS, RetrievalImages, evaluate_revisited, list_distractors,
                                 load_ground_truth, rank_database)
from ibot.eval.weights import load_pretrained_weights
from ibot.utils.distributed import get_rank, init_distributed_once, shutdown_distributed
from ibot.utils.misc import bool_flag, fix_random_seeds, print_run_header

__all__ = ["get_args_parser", "main", "evaluate_key"]


def get_args_parser(add_help=True):
    """Official flags (common ones from :mod:`ibot.eval.flags`) plus ``--distractors_path`` and ``--output_dir``."""
    p = argparse.ArgumentParser("Image retrieval on revisited Paris and Oxford", add_help=add_help, parents=[
        features_parser(n_last_blocks=1), backbone_parser(family="vit", window_size=None),
        data_parser("/path/to/revisited_paris_oxford/", batch_size=None), launch_parser()])
    p.add_argument("--dataset", default="roxford5k", type=str, choices=list(DATASETS))
    p.add_argument("--multiscale", default=False, type=bool_flag, help="average over scales 1, 1/sqrt(2), 1/2")
    p.add_argument("--imsize", default=224, type=int, help="longer side of every image (shrunk, aspect kept)")
    p.add_argument("--use_cuda", default=True, type=bool_flag)
    p.add_argument("--distractors_path", default="", type=str,
                   help="optional folder of distractor images (e.g. R1M) added to the database")
    p.add_argument("--output_dir", default="", type=str, help="where to write the JSON results (optional)")
    return p


def _devices(args):
    """(model device, feature-bank device): the GPU when there is one (``args.device`` of the process
    group set-up); ``--use_cuda false`` keeps the features on the CPU (official meaning)."""
    device = getattr(args, "device", None) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, (device if args.use_cuda else torch.device("cpu"))


def evaluate_key(args, cfg):
    """Extract, rank and score for one ``args.checkpoint_key``; returns the dict of
    :func:`ibot.eval.retrieval.evaluate_revisited` (rank 0; None on other ranks)."""
    device, bank = _devices(args)
    fix_random_seeds(0)    # the same random initialisation on every rank when no weights are given
    model = build_backbone(args.arch, args.patch_size, avgpool_patchtokens=args.avgpool_patchtokens)
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    db = RetrievalImages.from_ground_truth(args.data_path, args.dataset, "db", args.imsize, cfg)
    if args.distractors_path:
        extra = list_distractors(args.distractors_path)
        print(f"Adding {len(extra)} distractors from {args.distractors_path}")
        db.samples += extra
    queries = RetrievalImages.from_ground_truth(args.data_path, args.dataset, "query", args.imsize, cfg)
    print(f"train: {len(db)} imgs / query: {len(queries)} imgs")
    feats = {}
    for name, ds in (("database", db), ("query", queries)):
        loader = make_loader(ds, 1, args.num_workers)
        feats[name], _ = extract_features(model, loader, args.n_last_blocks, args.avgpool_patchtokens,
                                          device=device, bank_device=bank, l2_normalize=True,
                                          multiscale=args.multiscale,
                                          print_freq=50, header=f"{name}:")
    if get_rank() != 0:
        return None
    ranks = rank_database(feats["database"], feats["query"])
    res = evaluate_revisited(ranks, cfg["gnd"], ks=(1, 5, 10))
    mpr = lambda tag: [round(res[f"mP@k_{tag}"][k], 2) for k in res["ks"]]  # noqa: E731
    print(f">> {args.dataset}: mAP M: {res['mAP_M']:.2f}, H: {res['mAP_H']:.2f}")
    print(f">> {args.dataset}: mP@k{res['ks']} M: {mpr('M')}, H: {mpr('H')}")
    return res


def main(argv=None):
    """Evaluate every key of ``--checkpoint_key``; returns ``{key: results}`` (rank 0)."""
    args = get_args_parser().parse_args(argv)
    # fail on a missing or unsafe ground-truth file before anything is built
    cfg = load_ground_truth(os.path.join(args.data_path, args.dataset, f"gnd_{args.dataset}.pkl"))
    init_distributed_once(args)
    print_run_header(args)
    out = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()] or [None]:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        print(f"==> checkpoint_key: {key}")
        res = evaluate_key(a, cfg)
        if res is None:
            continue
        record = {"dataset": args.dataset, "checkpoint_key": key, "imsize": args.imsize,
                  "multiscale": args.multiscale, "n_database": len(cfg["imlist"]), "n_queries": len(cfg["qimlist"]),
                  **res}
        print("json: " + json.dumps(record))
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"retrieval_{args.dataset}_{key}.json"), "w") as f:
                json.dump(record, f, indent=1)
        out[key] = record
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
    shutdown_distributed()
