"""Transfer fine-tuning of a pretrained iBOT backbone (DeiT recipe; spec ``evaluation.md`` §2.6).

run.sh invocation (``cifar_cls`` etc.)::

    python -m torch.distributed.run --nproc_per_node=8 evaluation/eval_cls.py \
        --arch vit_base --pretrained_weights OUT/checkpoint.pth --checkpoint_key teacher \
        --output_dir OUT/cls --data_path data/cifar --data_set CIFAR \
        --batch-size 96 --lr 7.5e-6 --epochs 1000

The recipe (data sets, model, optimiser, schedule, outputs, deviations from the reference) is
:mod:`ibot.eval.transfer`.
"""
import argparse

from ibot.eval.transfer import (BackboneWithHead, build_dataset, build_finetune_backbone, build_model,
                                new_linear_head, run_transfer, transfer_args_parser)
from ibot.utils.distributed import shutdown_distributed

__all__ = ["get_args_parser", "main", "build_model", "build_dataset", "build_finetune_backbone", "BackboneWithHead",
           "new_linear_head"]


def get_args_parser(semi=False):
    """The recipe's flags (a parent parser, as the official script's)."""
    return transfer_args_parser(semi)


def main(args, build_model_fn=build_model):
    """Fine-tune every key of ``args.checkpoint_key``. Returns ``{key: {'max_accuracy': ...}}``."""
    return run_transfer(args, build_model_fn)


if __name__ == "__main__":
    parser = argparse.ArgumentParser("iBOT transfer fine-tuning", parents=[get_args_parser()])
    main(parser.parse_args())
    shutdown_distributed()
