"""Semi-supervised fine-tuning on the 1% / 10% ImageNet subsets (spec ``evaluation.md`` §2.7).

run.sh / README invocation::

    python -m torch.distributed.run --nproc_per_node=8 evaluation/semi_supervised/eval_cls.py \
        --arch vit_small --pretrained_weights OUT/checkpoint.pth --checkpoint_key teacher \
        --output_dir OUT/semi_cls --data_path data/imagenet_1p_split \
        --epochs 1000 --lr 5e-6 --finetune_head_layer 1

The recipe is that of ``evaluation/eval_cls.py`` (same data sets, transforms, ``RASampler``,
mixup/smoothing, AMP, EMA, checkpoint ``checkpoint_<key>_cls.pth`` and ``log.txt``; all of it is
shared, not copied) with these differences: ``--lr`` defaults to 1e-3 (still × batch·world / 512),
``--aa none`` (no RandAugment), ``--teacher-model self``, and the head:

- ``--finetune_head_layer 0``: a plain Linear(D, classes);
- ``k >= 1``: a ``ClassProjHead`` keeping a prefix of the pretrained 3-layer projection MLP
  (Linear D→2048, GELU, Linear 2048→2048, GELU, Linear 2048→256, L2-normalise, weight-normalised
  Linear 256→``--out_dim`` with g fixed to 1) followed by a new ``cls_head`` Linear:
  k=1: ``mlp.0`` + GELU → cls_head(2048); k=2: ``mlp.0..3`` → cls_head(2048);
  k=3: the whole head including ``last_layer`` → cls_head(out_dim).

The head is attached and initialised (truncated normal 0.02) before the weights are loaded; the
kept layers take the checkpoint's ``head.mlp.*`` / ``head.last_layer.*`` tensors (after removing
``module.``/``backbone.`` prefixes) and ``cls_head`` stays random. Flags parsed but unused in the
reference (``--distill_epochs``, ``--layer_decay``, ``--disable_weight_decay_on_cls_pos``,
``--disable_weight_decay_on_rel_pos_bias``, ``--layer_scale_init_value``) are accepted and ignored.

Deviations from the reference (besides those of ``evaluation/eval_cls.py``):
- only the kept layers of the projection head are built (the reference builds the full MLP and
  runs a prefix of it), so no unused parameters reach the optimiser or DDP; the parameter names
  (``head.mlp.0``, ``head.mlp.2``, ``head.mlp.4``, ``head.last_layer``, ``head.cls_head``) are the same;
- with ``--finetune_head_layer >= 1`` a checkpoint without the needed ``head.*`` tensors (e.g. a
  backbone-only file) is an error instead of a silent random initialisation;
- the model's state dict is ``backbone.*`` + ``head.*``.
"""
import argparse

import torch.nn.functional as F
from torch import nn

from ibot.eval.transfer import (BackboneWithHead, build_finetune_backbone, new_linear_head, run_transfer,
                                transfer_args_parser)
from ibot.eval.weights import load_pretrained_weights, select_state_dict, strip_prefixes
from ibot.models.head import weight_norm_linear
from ibot.models.init import trunc_normal_init
from ibot.utils.checkpoint import safe_load
from ibot.utils.distributed import shutdown_distributed


class ClassProjHead(nn.Module):
    """First ``finetune_head_layer`` layers of the pretrained projection head + a new ``cls_head``.

    ``forward(x (B, in_dim)) -> logits (B, num_classes)``.
    """

    def __init__(self, in_dim, num_classes, out_dim=8192, finetune_head_layer=1, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        if finetune_head_layer not in (1, 2, 3):
            raise ValueError("finetune_head_layer must be 1, 2 or 3 for a ClassProjHead")
        self.finetune_head_layer = finetune_head_layer
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        if finetune_head_layer >= 2:
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        if finetune_head_layer >= 3:
            layers += [nn.Linear(hidden_dim, bottleneck_dim)]
        self.mlp = nn.Sequential(*layers)
        self.last_layer = None
        if finetune_head_layer == 3:
            self.last_layer = weight_norm_linear(bottleneck_dim, out_dim, freeze_g=True)
        self.cls_head = nn.Linear(out_dim if finetune_head_layer == 3 else hidden_dim, num_classes)
        self.apply(trunc_normal_init)

    def forward(self, x):
        x = self.mlp(x)
        if self.last_layer is not None:
            x = self.last_layer(F.normalize(x, dim=-1, p=2))
        return self.cls_head(x)


def load_head_weights(head, path, checkpoint_key):
    """Copy the checkpoint's ``head.*`` tensors into the kept layers of ``head`` (not ``cls_head``)."""
    raw, where = select_state_dict(safe_load(path), checkpoint_key, source=path)
    sd = strip_prefixes(raw)
    head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    wanted = [k for k in head.state_dict() if not k.startswith("cls_head.")]
    if not head_sd:
        raise RuntimeError(f"{path}{where} holds no projection-head ('head.*') tensors, needed by "
                           f"--finetune_head_layer {head.finetune_head_layer}; pass a full pre-training "
                           f"checkpoint (teacher/student) or use --finetune_head_layer 0")
    to_load = {k: v for k, v in head_sd.items() if k in wanted}
    result = head.load_state_dict(to_load, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("cls_head.")]
    if missing:
        raise RuntimeError(f"projection-head tensors missing from {path}{where}: {missing}")
    print(f"Projection head: loaded {sorted(to_load)} from {path}{where}; cls_head is new")


def build_model(args, nb_classes, checkpoint_key):
    """Backbone + head (attached and initialised first), then the pretrained weights."""
    backbone, dim = build_finetune_backbone(args)
    if args.finetune_head_layer == 0:
        head = new_linear_head(dim, nb_classes, args.init_scale)
    else:
        head = ClassProjHead(dim, nb_classes, out_dim=args.out_dim, finetune_head_layer=args.finetune_head_layer)
    load_pretrained_weights(backbone, args.pretrained_weights, checkpoint_key, args.arch, args.patch_size)
    if args.finetune_head_layer > 0 and args.pretrained_weights:
        load_head_weights(head, args.pretrained_weights, checkpoint_key)
    return BackboneWithHead(backbone, head)


def get_args_parser():
    """The DeiT recipe's flags with the semi-supervised defaults and head flags (a parent parser)."""
    return transfer_args_parser(semi=True)


def main(args):
    """Fine-tune every key of ``args.checkpoint_key`` with :func:`build_model`'s head."""
    return run_transfer(args, build_model_fn=build_model)


if __name__ == "__main__":
    parser = argparse.ArgumentParser("iBOT semi-supervised fine-tuning", parents=[get_args_parser()])
    main(parser.parse_args())
    shutdown_distributed()
