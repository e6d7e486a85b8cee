"""iBOT pre-training — the official entry point.

    python main_ibot.py --data_path /path/to/imagenet/train --output_dir out/    # one process, GPU or CPU
    torchrun --nproc_per_node 8 main_ibot.py --arch vit_small --data_path ... --output_dir ...

Flags, defaults and files are the official ones (``python main_ibot.py --help``); the code lives in the
``ibot`` package and is re-exported here under its official names.
"""
import argparse
import sys

from ibot.augment import DataAugmentationiBOT  # noqa: F401  (official name)
from ibot.cli import check_args, get_args_parser  # noqa: F401
from ibot.loss import iBOTLoss  # noqa: F401
from ibot.pretrain import ConfigError, train_ibot
from ibot.train import train_one_epoch  # noqa: F401

__all__ = ["get_args_parser", "iBOTLoss", "DataAugmentationiBOT", "train_one_epoch", "train_ibot"]


def main(argv=None):
    parser = argparse.ArgumentParser("iBOT", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        train_ibot(args)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
