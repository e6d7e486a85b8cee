"""Train the COCO Cascade Mask R-CNN (or Mask R-CNN) on an iBOT ViT backbone (evaluation.md §2.12).

    python evaluation/object_detection/train.py --preset vit_small_1x --arch vit_small --patch_size 16 \
        --pretrained_weights backbone.pth --checkpoint_key state_dict --data_path data/coco --output_dir out/det
    torchrun --nproc_per_node 8 evaluation/object_detection/train.py ...   # official 8-GPU runs

Prints the COCO box and mask AP table of pycocotools after every evaluation and ends with
``bbox AP: <percent>`` and ``segm AP: <percent>`` of the final checkpoint. The logic is in
:mod:`ibot.detection.trainer`.
"""
import argparse
import logging

from ibot.detection.trainer import add_common_args, add_train_args, train
from ibot.utils.distributed import shutdown_distributed

__all__ = ["get_args_parser", "main"]


def get_args_parser(add_help=True):
    """Preset, data, backbone and schedule flags (``--help`` lists them)."""
    parser = argparse.ArgumentParser("COCO detection with an iBOT backbone", add_help=add_help)
    return add_train_args(add_common_args(parser))


def main(args):
    """Train as ``args`` say; returns the final metrics (rank 0)."""
    return train(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
