"""iBOT pre-training — the official entry point.

    python main_ibot.py --data_path /path/to/imagenet/train --output_dir out/    # one process, GPU or CPU
    python main_ibot.py --config configs/vit_small_16_800ep.yaml --data_path ... --output_dir ...
    torchrun --nproc_per_node 8 main_ibot.py --arch vit_small --data_path ... --output_dir ...

Flags, defaults and files are the official ones (``python main_ibot.py --help``); the code lives in the
``ibot`` package and is re-exported here under its official names.
"""
import argparse
import sys

from ibot.data.augment import DataAugmentationiBOT  # noqa: F401  (official name)
from ibot.train.config import parse_with_config
from ibot.train.flags import get_args_parser
from ibot.train.loss import iBOTLoss  # noqa: F401
from ibot.utils.checkpoint import CheckpointWriteError, CorruptCheckpointError, UnsafeCheckpointError
from ibot.data.folders import BadImageError
from ibot.utils.distributed import shutdown_distributed
from ibot.train.faults import TrainingInterrupted
from ibot.train.driver import ConfigError, train_ibot
from ibot.train.epoch import train_one_epoch  # noqa: F401
from ibot.train.step import NonFiniteLossError

__all__ = ["get_args_parser", "iBOTLoss", "DataAugmentationiBOT", "train_one_epoch", "train_ibot"]


def main(argv=None):
    """Parse ``argv`` and train. Expected failures print one message (no traceback) and exit with:

    * 2 — bad flags, paths or data found before training (``ConfigError``), or a checkpoint that is
      unsafe (would run code when unpickled), corrupt or missing where one is required;
    * 1 — training stopped: non-finite loss/weights (the message names the global step, epoch, term,
      lr, temperatures and gradient norm), an unreadable image (named), or a failed checkpoint write
      (the previous checkpoint is intact);
    * 0 — stopped by SIGTERM (pre-emption) after writing checkpoint.pth; 130 — same after SIGINT.
    """
    parser = argparse.ArgumentParser("iBOT", parents=[get_args_parser()])
    args = parse_with_config(parser, argv)
    try:
        train_ibot(args)
        shutdown_distributed()
    except (ConfigError, UnsafeCheckpointError, CorruptCheckpointError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except (NonFiniteLossError, BadImageError, CheckpointWriteError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    except TrainingInterrupted as err:
        parser.exit(err.exit_code, f"{parser.prog}: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
