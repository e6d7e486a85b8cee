"""Worker for test_distributed.py: two training steps on a fixed global batch of 2B images.

Run either as one plain process (sees all 2B images) or under ``torchrun --nproc_per_node 2`` (each
rank sees its B images, gloo). ``argv[2]``: training steps to run one after the other, comma-separated
(``fast,reference``; one launch serves both). Writes ``{step: losses, centres and teacher weights of
rank 0}`` to ``argv[1]``.
"""
import os
import random
import sys

import torch

from ibot.train.flags import get_args_parser
from ibot.utils.distributed import (all_reduce_sum, get_rank, get_world_size, init_distributed,
                              shutdown_distributed)
from ibot.data.masking import MaskGenerator
from ibot.utils.misc import fix_random_seeds
from ibot.train.context import make_context
from ibot.train.driver import build_networks, build_optimization, wrap_and_init_teacher
from ibot.train.step import iBOTTrainStep

GLOBAL_BATCH = 8


def run(train_step_impl, info):
    """Two steps of ``train_step_impl`` on the fixed batch; rank 0's record (other ranks: None)."""
    args = get_args_parser().parse_args([
        "--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
        "--drop_path", "0", "--epochs", "2", "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1",
        "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2", "--norm_last_layer", "false",
        "--shared_head", "true", "--train_step", train_step_impl, "--lr", "0.01",
        "--batch_size_per_gpu", str(GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", 1)))])
    ctx = make_context(args, info, precision="fp32")
    fix_random_seeds(0)
    student, teacher = build_networks(args)
    student, teacher, teacher_without_ddp = wrap_and_init_teacher(student, teacher, ctx)
    loss_fn, optimizer, scaler, (lr, wd, mom) = build_optimization(student, args, ctx, niter_per_epoch=2)
    step = iBOTTrainStep.from_args(student, teacher, teacher_without_ddp, loss_fn, args, ctx, scaler)

    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    masks_gen = MaskGenerator(None, args.pred_ratio, args.pred_ratio_var)
    world, rank = get_world_size(), get_rank()
    b = GLOBAL_BATCH // world
    record = {"loss": [], "cls": [], "patch": []}
    for it in range(2):
        images = [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen) for _ in range(2)]
        images += [torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen) for _ in range(2)]
        masks = [torch.from_numpy(__import__("numpy").stack([masks_gen(rng, grid_hw=(4, 4))
                                                              for _ in range(GLOBAL_BATCH)])) for _ in range(2)]
        mine = slice(rank * b, (rank + 1) * b)
        losses, _, _, _ = step.train_step(optimizer, [im[mine] for im in images], [m[mine] for m in masks],
                                          it, 0, (lr, wd, mom))
        for key in record:  # mean over ranks = loss of the whole batch
            record[key].append(all_reduce_sum(losses[key].detach().clone()).item() / world)
    if rank != 0:
        return None
    return {**record, "center": loss_fn.center, "center2": loss_fn.center2,
            "teacher": teacher_without_ddp.state_dict()}


def main(out_path, impls):
    info = init_distributed("env://")
    records = {impl: run(impl, info) for impl in impls}
    if get_rank() == 0:
        torch.save(records, out_path)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "fast").split(","))
