"""Evaluate a detection checkpoint of train.py on COCO val2017 (box and mask AP, pycocotools).

    python evaluation/object_detection/test.py --preset vit_small_1x --data_path data/coco \
        --checkpoint out/det/checkpoint.pth --output_dir out/det

The network settings come from the checkpoint (the preset flags are accepted for symmetry with
train.py; ``--img_scale`` / ``--amp`` override). Prints the AP table and ``bbox AP: <percent>`` /
``segm AP: <percent>``; writes ``test_results.json`` and ``predictions.png`` to ``--output_dir``.
"""
import argparse
import logging

from ibot.detection.trainer import add_common_args, add_train_args, test
from ibot.utils.distributed import shutdown_distributed

__all__ = ["get_args_parser", "main"]


def get_args_parser(add_help=True):
    """train.py's flags plus ``--checkpoint`` (training-only flags are accepted and unused, so that
    run.sh passes one flag list to both)."""
    parser = argparse.ArgumentParser("COCO evaluation of a detection checkpoint", add_help=add_help)
    add_train_args(add_common_args(parser))
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by train.py")
    return parser


def main(args):
    """Evaluate ``args.checkpoint``; returns the metrics (rank 0)."""
    return test(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
