"""Multinomial logistic regression on frozen features (official ``eval_logistic_regression.py``, §2.2).

    python evaluation/eval_logistic_regression.py --arch vit_small --pretrained_weights ckpt.pth \
        --data_path /data/imagenet_1p_split --lr_lambd 0.01 0.1 1

Features: exactly those of ``eval_knn.py`` (normed [CLS] of the last block by default, L2-normalised
rows; ``--dump_features`` / ``--load_features`` use the same four files, so k-NN dumps can be
reused). One fit per λ in ``--lr_lambd``; output: one line per λ with the val accuracy as a FRACTION
in [0, 1] (as cyanure's score).

DEVIATION (stated on purpose): the official script used cyanure 0.2x (``MultiClassifier``,
solver "catalyst-miso", tol 1e-3, ``max_epochs = --epochs``), whose API no longer exists. This script
solves the same problem — multinomial logistic loss, L2 penalty, NO intercept, on the unit-normalised
features — with scikit-learn's ``LogisticRegression(solver="lbfgs")``. cyanure minimises
``(1/n) Σ loss + (λ/2)‖W‖²``; scikit-learn minimises ``C Σ loss + ½‖W‖²``, the same problem for
``C = 1 / (n λ)``. ``--epochs`` becomes L-BFGS's ``max_iter`` (iterations, not data passes; default
raised to 1000) and the stopping tolerance is scikit-learn's (``--tol``, default 1e-4), so the
optimum is the same up to solver tolerance but the path is not. Runs on rank 0 only.
"""
import argparse
import copy
import logging
import os
import warnings

import numpy as np
import torch

from ibot.eval.features import check_image_folder
from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser
from ibot.eval.knn import checkpoint_features, key_dump_dir
from ibot.utils.distributed import (init_distributed_once, is_dist_avail_and_initialized, is_main_process,
                                    shutdown_distributed)
from ibot.utils.misc import bool_flag, print_run_header

__all__ = ["get_args_parser", "main", "fit_logistic_regression"]


def get_args_parser(add_help=True):
    """Official flags (``--lr_lambd``, ``--epochs``, ``--it0`` + the k-NN feature flags) plus
    ``--resize_size``, ``--crop_size``, ``--tol``, ``--seed``."""
    p = argparse.ArgumentParser("Logistic regression on frozen features", add_help=add_help,
                                parents=[backbone_parser(), features_parser(n_last_blocks=1),
                                         data_parser(image_sizes=True), launch_parser()])
    p.add_argument("--lr_lambd", default=[0.01, 0.1, 1.0], nargs="+", type=float, help="L2 strengths λ")
    p.add_argument("--epochs", default=1000, type=int, help="max L-BFGS iterations (cyanure: max epochs)")
    p.add_argument("--it0", default=10, type=int, help="accepted for compatibility (cyanure duality-gap period)")
    p.add_argument("--tol", default=1e-4, type=float, help="scikit-learn tolerance")
    p.add_argument("--use_cuda", default=True, type=bool_flag)
    p.add_argument("--dump_features", default=None)
    p.add_argument("--load_features", default=None)
    p.add_argument("--seed", default=0, type=int)
    return p


def fit_logistic_regression(train_features, train_labels, test_features, test_labels, lambd, max_iter=1000,
                            tol=1e-4):
    """Fit multinomial L2 logistic regression without intercept and score it.

    Args:
        train_features: (N, d) array/tensor (L2-normalised rows); train_labels: (N,) ints.
        test_features: (M, d); test_labels: (M,).
        lambd: cyanure-style λ of ``(1/N) Σ loss + (λ/2)‖W‖²`` (→ scikit-learn ``C = 1/(N λ)``).
    Returns:
        accuracy on the test rows, a fraction in [0, 1].
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    xtr = np.asarray(torch.as_tensor(train_features).cpu().double().numpy())
    xte = np.asarray(torch.as_tensor(test_features).cpu().double().numpy())
    ytr = np.asarray(torch.as_tensor(train_labels).cpu().numpy())
    yte = np.asarray(torch.as_tensor(test_labels).cpu().numpy())
    clf = LogisticRegression(C=1.0 / (len(ytr) * lambd), fit_intercept=False, solver="lbfgs",
                             max_iter=max_iter, tol=tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(xtr, ytr)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logging.getLogger("evaluation.eval_logistic_regression").warning(
            "L-BFGS did not converge in %d iterations for lambda=%g", max_iter, lambd)
    return float(clf.score(xte, yte))


def _features_for_key(args, device):
    features, _ = checkpoint_features(
        args.pretrained_weights, args.data_path, arch=args.arch, patch_size=args.patch_size,
        checkpoint_key=args.checkpoint_key, resize_size=args.resize_size, crop_size=args.crop_size,
        batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, n_last_blocks=args.n_last_blocks,
        avgpool_patchtokens=args.avgpool_patchtokens, window_size=args.window_size, seed=args.seed,
        use_cuda=args.use_cuda, device=device, load_features=args.load_features, dump_features=args.dump_features)
    return features


def main(args):
    """Fit one classifier per λ for every checkpoint key. Returns ``{key: {λ: accuracy fraction}}`` (rank 0)."""
    init_distributed_once(args)
    print_run_header(args)
    if not args.load_features:
        for split in ("train", "val"):
            check_image_folder(os.path.join(args.data_path, split))
    keys = [k.strip() for k in args.checkpoint_key.split(",") if k.strip()]
    rank0 = is_main_process()
    out = {}
    for key in keys:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        a.dump_features = key_dump_dir(args.dump_features, key, keys)
        a.load_features = key_dump_dir(args.load_features, key, keys)
        trf, trl, tef, tel = _features_for_key(a, getattr(args, "device", torch.device("cpu")))
        if not rank0:
            continue
        out[key] = {}
        for lambd in args.lr_lambd:
            acc = fit_logistic_regression(trf, trl, tef, tel, lambd, args.epochs, args.tol)
            out[key][lambd] = acc
            print(f"Logistic regression result (lambda {lambd}): Accuracy: {acc}")
    if is_dist_avail_and_initialized():
        torch.distributed.barrier()
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
