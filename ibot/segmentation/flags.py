"""Command-line flags shared by ``evaluation/semantic_segmentation/train.py`` and ``test.py``."""
import os

import torch

from ibot.models import arch_choices
from ibot.utils.misc import bool_flag

from .presets import preset_names

__all__ = ["add_preset_flags", "add_training_flags", "resolve_device_and_amp"]


def add_preset_flags(parser):
    """The preset, backbone, data and run flags (overrides default to None: the preset's value)."""
    parser.add_argument("--preset", default="upernet/vit_base_512", choices=preset_names(),
                        help="official config (configs/<head>/<arch>_<crop>_ade20k_160k[_ms|_pt2ft].py)")
    parser.add_argument("--arch", default=None, choices=arch_choices(family="vit"),
                        help="backbone (default: the preset's)")
    parser.add_argument("--patch_size", default=None, type=int, help="ViT patch size (default 16)")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="pre-training checkpoint or backbone file; '' = random initialisation")
    parser.add_argument("--checkpoint_key", default="teacher", type=str, help="teacher / student / state_dict")
    parser.add_argument("--data_path", default="data/ade/ADEChallengeData2016", type=str,
                        help="ADEChallengeData2016 (images/ and annotations/) or the folder holding it")
    parser.add_argument("--output_dir", default=".", type=str)
    parser.add_argument("--crop_size", default=None, type=int,
                        help="crop S: resize scale (4S, S), sliding window S, stride floor(2S/3)")
    parser.add_argument("--num_classes", default=None, type=int, help="classes after reduce_zero_label (150)")
    parser.add_argument("--batch_size_per_gpu", default=None, type=int)
    parser.add_argument("--out_with_norm", default=None, type=bool_flag,
                        help="final LayerNorm on the taps (README overrides: true)")
    parser.add_argument("--use_cuda", default=True, type=bool_flag, help="false: run on the CPU")
    parser.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"],
                        help="autocast: auto = fp16 on GPUs when the preset used apex fp16, else off")
    parser.add_argument("--num_workers", default=4, type=int)
    parser.add_argument("--mode", default="slide", choices=["slide", "whole"], help="test-time inference")
    parser.add_argument("--num_panel", default=4, type=int, help="validation images drawn in the PNG")
    return parser


def add_training_flags(parser):
    """Schedule overrides and run controls of training (``test.py`` accepts them too, so that
    ``run.sh`` can hand both scripts the same extra arguments; there they only shape the preset)."""
    group = parser.add_argument_group("schedule overrides (default: the preset's values)")
    group.add_argument("--max_iters", default=None, type=int)
    group.add_argument("--lr", default=None, type=float, help="base lr of AdamW")
    group.add_argument("--layer_decay_rate", default=None, type=float)
    group.add_argument("--warmup_iters", default=None, type=int)
    group.add_argument("--drop_path_rate", default=None, type=float)
    group.add_argument("--checkpoint_interval", default=None, type=int, help="iterations between checkpoints")
    group.add_argument("--eval_interval", default=None, type=int, help="iterations between evaluations")
    parser.add_argument("--auto_resume", default=False, type=bool_flag,
                        help="resume from <output_dir>/latest.pth when it exists")
    parser.add_argument("--resume_from", default=None, type=str, help="checkpoint to resume from")
    parser.add_argument("--use_checkpoint", default=False, type=bool_flag,
                        help="activation checkpointing of the backbone blocks (run.sh: true, as official)")
    parser.add_argument("--check_labels", default=-1, type=int,
                        help="label maps validated per split before training (-1: all)")
    parser.add_argument("--stop_iter", default=None, type=int,
                        help="stop after this iteration with a checkpoint (an interruption; resume later)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--print_freq", default=50, type=int, help="iterations between progress lines")
    return parser


def resolve_device_and_amp(args, preset):
    """Set ``args.device`` (hiding GPUs when ``--use_cuda false``) and ``args.amp`` ('fp16'/'bf16'/'off')."""
    if not args.use_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    use_cuda = args.use_cuda and torch.cuda.is_available()
    if getattr(args, "device", None) is None or not use_cuda:
        args.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if args.amp == "auto":
        args.amp = "fp16" if (use_cuda and preset.fp16) else "off"
    if args.amp == "fp16" and not use_cuda:
        raise ValueError("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU")
    return args
