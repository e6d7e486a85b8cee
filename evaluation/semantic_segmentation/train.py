"""Train a semantic segmentor on ADE20K with an official iBOT config (evaluation.md §2.13).

Usage (one process: the GPU if there is one; ``--use_cuda false`` for the CPU)::

    python evaluation/semantic_segmentation/train.py --preset upernet/vit_base_512 --arch vit_base \
        --patch_size 16 --pretrained_weights work_dirs/vitb16/checkpoint.pth --checkpoint_key teacher \
        --data_path data/ade/ADEChallengeData2016 --output_dir work_dirs/vitb16/seg

Several GPUs: ``torchrun --nproc_per_node 8 evaluation/semantic_segmentation/train.py ...`` (SyncBN,
DDP). The run ends by evaluating the final checkpoint on the validation split and printing the
per-class IoU, pixel accuracy and a line ``mIoU: <percent>``. Replaces mmseg's ``tools/train.py``
with the official config file: see ``ibot.segmentation`` for what is reproduced.
"""
import argparse
import logging

from ibot.segmentation.flags import add_preset_flags, add_training_flags, resolve_device_and_amp
from ibot.segmentation.trainer import resolve_preset, train
from ibot.utils.distributed import init_distributed_mode, shutdown_distributed
from ibot.utils.misc import fix_random_seeds, print_run_header


def get_args_parser():
    parser = argparse.ArgumentParser("iBOT ADE20K semantic segmentation: train", add_help=True)
    add_preset_flags(parser)
    add_training_flags(parser)
    return parser


def main(args):
    preset = resolve_preset(args)
    if not args.use_cuda:
        resolve_device_and_amp(args, preset)
    init_distributed_mode(args)
    resolve_device_and_amp(args, preset)
    fix_random_seeds(args.seed)
    print_run_header(args)
    metrics = train(args, preset, stop_iter=args.stop_iter)
    if metrics is None:
        print(f"stopped at iteration {args.stop_iter}; resume with --auto_resume true", flush=True)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
