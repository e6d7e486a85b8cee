"""Linear probe on frozen features, one learning rate (official ``eval_linear.py``, evaluation.md §2.3).

    python evaluation/eval_linear.py --arch vit_small --n_last_blocks 4 --avgpool_patchtokens 0 \
        --pretrained_weights ckpt.pth --checkpoint_key teacher --data_path /data/imagenet --output_dir out
    torchrun --nproc_per_node 8 evaluation/eval_linear.py ...      # several GPUs

Protocol: frozen backbone in eval mode under no_grad, features of §1.4 (``--n_last_blocks``,
``--avgpool_patchtokens``), one ``nn.Linear`` (weight ~ N(0, 0.01²), bias 0), SGD momentum 0.9,
weight decay 0, lr = ``--lr`` × total batch / 256, ``CosineAnnealingLR(T_max=epochs, eta_min=0)``
stepped per epoch, cross-entropy; train transform RandomResizedCrop + flip, val transform resize
(bicubic) + centre crop. Validation every ``--val_freq`` epochs and at the end; the best val top-1
is reported. When the top-1 is ≥ the best so far, rank 0 appends a JSON line to
``output_dir/log.txt`` and writes ``checkpoint_<key>_linear.pth`` (``epoch``, ``state_dict`` with
official ``module.linear.*`` keys, ``optimizer``, ``scheduler``, ``best_acc``) plus
``best_<key>.json``.

The machinery (shared with ``eval_linear_multi.py`` and ``analysis/linear_part/eval.py``: several heads
trained together on the same features) lives in :mod:`ibot.eval.linear`.

Differences from the official script: CPU runs work (gloo / no process group); ``--num_labels``
defaults to the number of class folders; ``--resize_size`` / ``--crop_size`` (256 / 224 officially
hard-coded) for small images; the val set is sharded across ranks (sums are all-reduced, each image
counted once); the process group is initialised once for a comma list of keys; data folders are
checked before any work; weights are loaded strictly (see ``ibot.eval.weights``).
"""
import argparse
import copy
import logging

from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser, linear_probe_parser
from ibot.eval.linear import (LARS, HeadSpec, LinearClassifier, build_linear_data, build_linear_heads, run_linear,
                              setup_linear_run)
from ibot.utils.distributed import shutdown_distributed

__all__ = ["LinearClassifier", "LARS", "HeadSpec", "build_linear_heads", "get_args_parser", "main", "run_linear",
           "build_linear_data"]


def get_args_parser(add_help=True, multi=False):
    """Official ``eval_linear.py`` flags (+ ``--resize_size``, ``--crop_size``); ``multi`` adds ``--sweep_lr_only``."""
    return argparse.ArgumentParser(
        "Evaluation with linear classification on ImageNet", add_help=add_help,
        parents=[backbone_parser(), features_parser(n_last_blocks=4), data_parser(image_sizes=True), launch_parser(),
                 linear_probe_parser(multi)])


def main(args):
    """Single-lr linear probe for every key of ``args.checkpoint_key``. Returns ``{key: run_linear result}``."""
    setup_linear_run(args)
    out = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()]:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        out[key] = run_linear(a, [HeadSpec(args.lr)], multi=False)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
