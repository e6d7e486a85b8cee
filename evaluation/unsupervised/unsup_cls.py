"""Unsupervised classification from the [CLS] projection head (official ``unsup_cls.py``, evaluation.md §2.8).

    python evaluation/unsupervised/unsup_cls.py --arch vit_small --patch_size 16 --out_dim 1000 \
        --pretrained_weights checkpoint.pth --checkpoint_key teacher --data_path /data/imagenet

Each val image is assigned the argmax of the [CLS] head logits (backbone → DINO head: 3 layers,
hidden 2048, GELU, bottleneck 256, L2 normalisation, weight-normalised Linear to ``--out_dim``);
the assignments are scored against the labels with :func:`eval_pred` (NMI, ARI, Fowlkes-Mallows F,
Hungarian-matched ACC; fractions in [0, 1]). Needs a checkpoint pre-trained with ``out_dim`` equal to
the number of classes for the square matching (1000 on ImageNet; not required here: rectangular
matchings are scored too).

Differences from the official script: checkpoint prefixes are normalised (the official script
wrapped the model in DDP before loading, so a ViT ``teacher`` entry — no ``module.`` prefix — did not
load; here ``teacher`` and ``student`` both load, strictly, head included, the iBOT patch head
``last_layer2`` being ignored); val images are sharded across ranks and gathered by index (the
official script predicted the full set on every rank and scored world_size copies); the Hungarian
matching uses SciPy instead of munkres; ``--resize_size`` / ``--crop_size`` and the head sizes
(``--head_hidden_dim``, ``--head_bottleneck_dim``, ``--head_nlayers``, official 2048 / 256 / 3) are
flags.
"""
import argparse
import logging
import os

import torch
from torch.utils.data.distributed import DistributedSampler

from ibot.eval.cluster_metrics import eval_pred
from ibot.eval.features import build_backbone, check_image_folder, eval_transform, image_folder, make_loader
from ibot.eval.flags import backbone_parser, data_parser, launch_parser
from ibot.eval.weights import PretrainedWeightsError, load_pretrained_weights, select_state_dict, strip_prefixes
from ibot.models import DINOHead
from ibot.utils.checkpoint import safe_load
from ibot.utils.distributed import (concat_all_gather, init_distributed_once, is_dist_avail_and_initialized,
                                    shutdown_distributed)
from ibot.utils.misc import print_run_header

__all__ = ["eval_pred", "get_args_parser", "main", "load_head", "predict"]


def get_args_parser(add_help=True):
    """Official flags plus ``--resize_size``, ``--crop_size`` and the head sizes."""
    p = argparse.ArgumentParser("Unsupervised classification", add_help=add_help,
                                parents=[backbone_parser(), data_parser(image_sizes=True), launch_parser()])
    p.add_argument("--out_dim", default=1000, type=int, help="output dimension of the [CLS] head")
    p.add_argument("--head_hidden_dim", default=2048, type=int)
    p.add_argument("--head_bottleneck_dim", default=256, type=int)
    p.add_argument("--head_nlayers", default=3, type=int)
    return p


def load_head(head, pretrained_weights, checkpoint_key):
    """Load the [CLS] projection head of a checkpoint entry into a ``DINOHead`` (strict).

    ``module.``/``_orig_mod.`` are stripped at the start of keys, ``head.`` is required; the iBOT
    patch-head entries ``last_layer2.*`` / ``last_norm2.*`` / ``mlp2.*`` are ignored. Raises
    ``PretrainedWeightsError`` naming missing / unexpected / mismatched keys.
    """
    ckpt = safe_load(pretrained_weights)
    sd, where = select_state_dict(ckpt, checkpoint_key, source=pretrained_weights)
    sd = strip_prefixes(sd, ("module.", "_orig_mod."))
    head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    head_sd = {k: v for k, v in head_sd.items() if not k.startswith(("last_layer2.", "last_norm2.", "mlp2."))}
    if not head_sd:
        raise PretrainedWeightsError(f"{pretrained_weights}{where} holds no projection-head (head.*) entries; "
                                     f"unsupervised classification needs a full pre-training checkpoint")
    own = head.state_dict()
    missing = [k for k in own if k not in head_sd]
    unexpected = [k for k in head_sd if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in head_sd.items()
                  if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise PretrainedWeightsError(
            f"head of {pretrained_weights}{where} does not match the DINO head: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {mismatched} (check --out_dim / --head_* flags)")
    head.load_state_dict(head_sd, strict=True)


@torch.no_grad()
def predict(backbone, head, loader, device):
    """Cluster assignment (argmax of the head logits) of every image of ``loader.dataset``.

    ``loader`` yields ``(images (B,3,H,W), labels (B,), indices (B,))``; with a ``DistributedSampler``
    the shards are gathered. Returns ``(labels (N,), preds (N,))`` int64 CPU tensors in dataset order.
    """
    n = len(loader.dataset)
    labels = torch.full((n,), -1, dtype=torch.long)
    preds = torch.full((n,), -1, dtype=torch.long)
    gather = is_dist_avail_and_initialized() and isinstance(loader.sampler, DistributedSampler)
    for images, target, index in loader:
        logits = head(backbone(images.to(device)))
        out = torch.stack([logits.argmax(dim=1), target.to(device), index.to(device)], dim=1)
        if gather:
            out = concat_all_gather(out)
        out = out.cpu()
        preds[out[:, 2]] = out[:, 0]
        labels[out[:, 2]] = out[:, 1]
    if (labels < 0).any():
        raise RuntimeError("some images received no prediction")
    return labels, preds


def main(args):
    """Score the head's argmax clustering on ``data_path/val``. Returns ``{"nmi", "ari", "fscore", "acc"}``."""
    init_distributed_once(args)
    print_run_header(args)
    val_dir = os.path.join(args.data_path, "val")
    check_image_folder(val_dir)
    if not args.pretrained_weights:
        raise ValueError("--pretrained_weights is required: the projection head cannot be evaluated at random init")
    device = getattr(args, "device", torch.device("cpu"))
    dataset = image_folder(val_dir, eval_transform(args.resize_size, args.crop_size))
    loader = make_loader(dataset, args.batch_size_per_gpu, args.num_workers)
    backbone = build_backbone(args.arch, args.patch_size, args.window_size, 0, img_size=args.crop_size)
    load_pretrained_weights(backbone, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    head = DINOHead(backbone.num_features if hasattr(backbone, "num_features") else backbone.embed_dim,
                    args.out_dim, act="gelu", nlayers=args.head_nlayers, hidden_dim=args.head_hidden_dim,
                    bottleneck_dim=args.head_bottleneck_dim)
    load_head(head, args.pretrained_weights, args.checkpoint_key)
    backbone.to(device).eval()
    head.to(device).eval()
    labels, preds = predict(backbone, head, loader, device)
    nmi, ari, f, acc = eval_pred(labels.numpy(), preds.numpy(), calc_acc=True)
    print(f"NMI: {nmi}, ARI: {ari}, F: {f}, ACC: {acc}")
    return {"nmi": nmi, "ari": ari, "fscore": f, "acc": acc}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
    shutdown_distributed()
