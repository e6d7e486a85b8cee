"""Evaluate a trained segmentor on the ADE20K validation split (mIoU as mmseg computes it).

Usage::

    python evaluation/semantic_segmentation/test.py --preset upernet/vit_base_512 --arch vit_base \
        --data_path data/ade/ADEChallengeData2016 --checkpoint work_dirs/vitb16/seg/iter_160000.pth

Pass the same preset and overrides (``--arch``, ``--patch_size``, ``--crop_size``, ``--num_classes``)
as for training. Prints per-class IoU / accuracy, ``aAcc`` / ``mAcc`` and a line ``mIoU: <percent>``;
writes ``<output_dir>/test_predictions.png`` and ``<output_dir>/test_metrics.json``.
Several GPUs: ``torchrun --nproc_per_node N ...`` (images sharded, areas summed).
"""
import argparse
import json
import logging
import os

from ibot.segmentation.flags import add_preset_flags, add_training_flags, resolve_device_and_amp
from ibot.segmentation.segmentor import build_segmentor
from ibot.segmentation.dataset import ADE20KDataset
from ibot.segmentation.trainer import evaluate, format_metrics, load_segmentor_checkpoint, resolve_preset
from ibot.utils.distributed import init_distributed_mode, is_main_process, shutdown_distributed
from ibot.utils.misc import print_run_header


def get_args_parser():
    parser = argparse.ArgumentParser("iBOT ADE20K semantic segmentation: test", add_help=True)
    add_preset_flags(parser)
    add_training_flags(parser)  # accepted (run.sh passes the same extras to both scripts)
    parser.add_argument("--checkpoint", required=True, type=str, help="segmentor checkpoint (iter_N.pth)")
    return parser


def main(args):
    preset = resolve_preset(args)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    if not args.use_cuda:
        resolve_device_and_amp(args, preset)
    init_distributed_mode(args)
    resolve_device_and_amp(args, preset)
    print_run_header(args)
    val_set = ADE20KDataset(args.data_path, "val", preset.num_classes, preset.reduce_zero_label)
    model = build_segmentor(preset)
    load_segmentor_checkpoint(model, args.checkpoint)
    model.to(args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = evaluate(model, val_set, preset, args.device, args.amp, mode=args.mode, num_panel=args.num_panel,
                       panel_path=os.path.join(args.output_dir, "test_predictions.png"))
    if is_main_process():
        with open(os.path.join(args.output_dir, "test_metrics.json"), "w") as f:
            json.dump({"checkpoint": args.checkpoint, "preset": preset.name, **metrics}, f)
        print(format_metrics(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
