"""Parent parsers of the evaluation and analysis scripts: each common flag is declared once, here.

A script builds its parser as ``argparse.ArgumentParser(..., parents=[backbone_parser(),
data_parser(...), launch_parser()])`` and adds only its own flags. The factories take the defaults
that differ between scripts (``--patch_size`` 8 for the attention figures, ``--n_last_blocks`` 4 for
the linear probe, ``--local_rank`` -1 for the BEiT recipe, ...), so every script keeps the names,
types and defaults it had; ``--arch`` choices are the registry's (``ibot.models.arch_choices``).
"""
import argparse

from ibot.models import arch_choices
from ibot.utils.misc import bool_flag

__all__ = ["backbone_parser", "features_parser", "data_parser", "launch_parser", "device_parser",
           "linear_probe_parser"]


def _parent():
    return argparse.ArgumentParser(add_help=False)


def backbone_parser(patch_size=16, window_size=7, family=None, pretrained_weights=True, checkpoint_key="teacher",
                    arch_flag="--arch"):
    """``--arch`` (registry choices, of ``family`` 'vit'/'swin' when given), ``--patch_size``,
    ``--window_size`` (omitted when None), ``--pretrained_weights`` (when asked) and ``--checkpoint_key``
    (omitted when None). ``arch_flag`` renames ``--arch`` (the occlusion script's ``--model_name``)."""
    p = _parent()
    p.add_argument(arch_flag, default="vit_small", type=str, choices=arch_choices(family),
                   help="registered architecture (ibot.models.list_models())")
    p.add_argument("--patch_size", default=patch_size, type=int, help="ViT patch size in pixels (Swin: 4)")
    if window_size is not None:
        p.add_argument("--window_size", default=window_size, type=int, help="Swin window size")
    if pretrained_weights:
        p.add_argument("--pretrained_weights", default="", type=str,
                       help="checkpoint file to evaluate ('' = random initialisation)")
    if checkpoint_key is not None:
        p.add_argument("--checkpoint_key", default=checkpoint_key, type=str,
                       help="entry of the checkpoint (teacher, student, ...); a comma list where the script "
                            "evaluates several")
    return p


def features_parser(n_last_blocks=1, avgpool_choices=(0, 1, 2)):
    """§1.4 frozen-feature options: ``--n_last_blocks`` (omitted when None) and ``--avgpool_patchtokens``."""
    p = _parent()
    if n_last_blocks is not None:
        p.add_argument("--n_last_blocks", default=n_last_blocks, type=int,
                       help="concatenate the [CLS] tokens of the last n blocks")
    p.add_argument("--avgpool_patchtokens", default=0, choices=list(avgpool_choices), type=int,
                   help="0: [CLS] only; 1: mean of the patch tokens; 2: [CLS] + mean of the patch tokens")
    return p


def data_parser(data_path="/path/to/imagenet/", batch_size=128, batch_flag="--batch_size_per_gpu", num_workers=10,
                image_sizes=False, with_data_path=True):
    """``--data_path`` (unless ``with_data_path`` is false: a script naming its data otherwise), the
    per-process batch size (``batch_flag``; omitted when ``batch_size`` is None),
    ``--num_workers`` and, with ``image_sizes``, ``--resize_size`` 256 / ``--crop_size`` 224 (the official
    evaluation transform; smaller for small images)."""
    p = _parent()
    if with_data_path:
        p.add_argument("--data_path", default=data_path, type=str, help="data folder (ImageFolder layout)")
    if batch_size is not None:
        p.add_argument(batch_flag, default=batch_size, type=int, help="batch size per process")
    p.add_argument("--num_workers", default=num_workers, type=int, help="data-loading workers per process")
    if image_sizes:
        p.add_argument("--resize_size", default=256, type=int, help="shorter side after the (bicubic) resize")
        p.add_argument("--crop_size", default=224, type=int, help="centre-crop size (also the ViT img_size)")
    return p


def launch_parser(local_rank=0):
    """``--dist_url`` and ``--local_rank``/``--local-rank`` (ignored: torchrun sets ``LOCAL_RANK``)."""
    p = _parent()
    p.add_argument("--dist_url", default="env://", type=str, help="process-group init method")
    p.add_argument("--local_rank", "--local-rank", default=local_rank, type=int,
                   help="ignored (torchrun sets LOCAL_RANK)")
    return p


def device_parser(default=None):
    """``--device`` (analysis scripts: None = CUDA when available, else the CPU)."""
    p = _parent()
    p.add_argument("--device", default=default, type=str, help="cuda or cpu (default: cuda when available)")
    return p


def linear_probe_parser(multi=False):
    """Flags of the linear probes (``eval_linear.py``, ``eval_linear_multi.py``, the part-wise probe):
    ``--epochs``, ``--lr``, ``--val_freq``, ``--output_dir``, ``--num_labels``, ``--load_from``, ``--seed``;
    ``multi`` adds ``--sweep_lr_only``."""
    p = _parent()
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--lr", default=0.001, type=float, help="lr for a total batch of 256 (scaled linearly)")
    p.add_argument("--val_freq", default=1, type=int)
    p.add_argument("--output_dir", default=".", type=str)
    p.add_argument("--num_labels", default=None, type=int, help="default: number of class folders")
    p.add_argument("--load_from", default=None, type=str, help="checkpoint file name in output_dir to resume")
    p.add_argument("--seed", default=0, type=int)
    if multi:
        p.add_argument("--sweep_lr_only", default=True, type=bool_flag,
                       help="only sweep lr (45 SGD heads, wd 0); false adds wd {0,1e-6} x {sgd,lars} (180 heads)")
    return p
