"""Linear probes for a whole lr grid trained together (official ``eval_linear_multi.py``, evaluation.md §2.4).

    python evaluation/eval_linear_multi.py --arch vit_small --n_last_blocks 4 --avgpool_patchtokens 0 \
        --pretrained_weights ckpt.pth --data_path /data/imagenet --output_dir out/linear
    torchrun --nproc_per_node 8 evaluation/eval_linear_multi.py ...

Grid: lr ∈ {1..9} × 10^k, k = -4..0 (45 values, each scaled by total batch / 256); with
``--sweep_lr_only true`` (default) wd = 0 and SGD only (45 heads), otherwise wd ∈ {0, 1e-6} ×
optimiser ∈ {sgd, lars} (180 heads), ordered (lr, wd, optim) with lr outermost. The backbone
features of each batch are computed once and shared by all heads; each head has its own optimiser
and ``CosineAnnealingLR``. The reported number is the best val top-1 over (head, validated epoch);
ties go to the later head. Files in ``--output_dir``: ``log.txt`` (JSON lines),
``checkpoint_<key>_linear.pth`` (``epoch``, ``state_dict`` with ``<i>.module.linear.*`` keys,
``optimizers``, ``schedulers``, ``best_acc``, ``best_acc_hidx``, ``best_acc_sweep_lr_only``) and
``best_<key>.json`` (best accuracy, epoch, head index and its lr/wd/optimizer).

Fixed official defects (§5 item 6): ``--sweep_lr_only`` is a real boolean flag; resume restores the
``optimizers``/``schedulers`` that are saved; the final best configuration is the argmax over all
validated epochs (the official script reported the best head of the last epoch). ``--lr`` is ignored.
Other differences: as in ``eval_linear.py``.
"""
import argparse
import copy
import logging

from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser, linear_probe_parser
from ibot.eval.linear import head_specs, lr_grid, run_linear, setup_linear_run
from ibot.utils.distributed import shutdown_distributed

__all__ = ["lr_grid", "head_specs", "get_args_parser", "main"]


def get_args_parser(add_help=True):
    """``eval_linear.py`` flags plus ``--sweep_lr_only``."""
    return argparse.ArgumentParser(
        "Evaluation with linear classification on ImageNet", add_help=add_help,
        parents=[backbone_parser(), features_parser(n_last_blocks=4), data_parser(image_sizes=True), launch_parser(),
                 linear_probe_parser(multi=True)])


def main(args):
    """Run the sweep for every key of ``args.checkpoint_key``. Returns ``{key: run_linear result}``."""
    setup_linear_run(args)
    out = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()]:
        a = copy.deepcopy(args)
        a.checkpoint_key = key
        out[key] = run_linear(a, head_specs(args.sweep_lr_only), multi=True)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
