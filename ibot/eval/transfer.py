"""The DeiT transfer fine-tuning recipe (spec ``evaluation.md`` §2.6): flags, data sets, model and the
per-key run, shared by ``evaluation/eval_cls.py`` and ``evaluation/semi_supervised/eval_cls.py`` (which
builds another head). The epoch loop is :func:`ibot.eval.finetune.train_one_epoch`.

Data sets (``--data_set``): ``CIFAR`` (CIFAR-100) and ``CIFAR10`` (torchvision on-disk format,
``download=False``), ``Cars`` (``cars_annos.mat``), ``Flwrs`` (``jpg/``, ``imagelabels.mat``,
``setid.mat``), ``INAT`` / ``INAT19`` (``train{Y}.json``, ``val{Y}.json``, ``categories.json``),
``IMNET`` and ``folder`` / ``image_folder`` (``train/`` and ``val/`` ImageFolders; the class count
is read from the folder).

Recipe: backbone from the registry (``ibot.models.create_backbone``; ViT with ``--drop-path``,
``--avgpool_patchtokens 1`` = mean pooling + ``fc_norm``; or Swin), weights loaded with ``ibot.eval.weights.load_pretrained_weights``,
then a new ``head`` Linear(D, classes) (truncated normal 0.02, bias 0) applied to the backbone
output. timm ``create_transform`` with RandAugment / RandomErasing, ``RASampler`` (repeated
augmentation ×3), timm ``Mixup``/CutMix + ``SoftTargetCrossEntropy`` (else label smoothing / CE),
AdamW (no weight decay on biases and 1-D parameters; ``pos_embed``/``cls_token`` are decayed as in
the reference), lr × batch × world / 512, per-epoch warm-up + cosine schedule with the values of
timm's ``CosineLRScheduler``, native AMP, model EMA (``timm.utils.ModelEmaV3``; saved, not
evaluated). ``--checkpoint_key`` may be a comma list: each key is fine-tuned in turn.

Outputs in ``--output_dir``: ``checkpoint_<key>_cls.pth`` (``model``, ``optimizer``,
``lr_scheduler``, ``epoch``, ``model_ema``, ``scaler``, ``args``, ``max_accuracy``) written atomically
whenever val top-1 ≥ the best so far, and one JSON line per epoch in ``log.txt``. "Max accuracy" is
the reported number. ``--resume`` continues at the next epoch.

Deviations from the reference:
- plain ``torch.optim.AdamW`` (or SGD) over our parameter groups and our per-epoch schedule
  (``ibot.eval.finetune.epoch_cosine_value``) instead of timm 0.3's ``create_optimizer`` /
  ``create_scheduler``; only ``--sched cosine`` is implemented (other values and lr noise are
  refused). As in the reference loop, epoch ``e`` trains with the schedule value of epoch
  ``max(e - 1, 0)`` (the scheduler is stepped with the finished epoch's index) — kept on purpose;
- no apex: native ``torch.autocast`` + ``torch.amp.GradScaler`` (AMP only on CUDA);
- ``--data_set`` accepts all seven data sets (the reference's choices rejected five); Cars uses 196
  classes and 0-based labels (the reference took the count from a bounding-box field);
- iNat image paths: ``file_name`` is used as given when that file exists, else DeiT's layout
  ``<root>/<dir>/<category_id>/<file>``;
- ``RASampler`` keeps ``ceil(len / world)`` samples per rank for data sets of fewer than 256 images
  (the reference yields an empty epoch);
- the broken ``--finetune`` path is refused (use ``--pretrained_weights``); distillation flags are
  accepted but only ``--distillation-type none`` runs;
- the model's state dict is ``backbone.*`` + ``head.*`` (the backbone and the head are two modules).
"""
import argparse
import copy
import datetime
import json
import os
import time

import torch
import torch.backends.cudnn as cudnn
from PIL import Image
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision import datasets, transforms

from ibot.eval.finetune import (GradScalerWithNorm, RASampler, barrier, build_finetune_transform, epoch_cosine_value,
                                evaluate, load_checkpoint_for_resume, save_checkpoint, save_json_log, train_one_epoch)
from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser
from ibot.eval.layer_decay import param_groups_layer_decay
from ibot.eval.weights import load_pretrained_weights
from ibot.models import create_backbone, model_family
from ibot.utils import distributed as ibot_dist
from ibot.utils.misc import fix_random_seeds, print_run_header

__all__ = ["DATA_SETS", "transfer_args_parser", "ListDataset", "build_transform", "build_dataset",
           "BackboneWithHead", "build_finetune_backbone", "new_linear_head", "build_model", "setup_run",
           "run_one_key", "run_transfer"]

DATA_SETS = ["CIFAR", "CIFAR10", "IMNET", "folder", "image_folder", "INAT", "INAT19", "Cars", "Flwrs"]


def transfer_args_parser(semi=False):
    """Flags of the DeiT transfer recipe (``evaluation/eval_cls.py``; ``semi``: the semi-supervised
    variant's defaults and extra flags). A parent parser (no ``-h``)."""
    p = argparse.ArgumentParser("iBOT transfer fine-tuning (DeiT recipe)", add_help=False, parents=[
        backbone_parser(), features_parser(n_last_blocks=None, avgpool_choices=(0, 1)),
        data_parser(data_path="data/imagenet", batch_size=None, num_workers=10), launch_parser()])
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", default=128, type=int, help="per GPU")
    p.add_argument("--epochs", default=300, type=int)
    # model
    p.add_argument("--input-size", "--input_size", dest="input_size", default=224, type=int)
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--attn_drop_rate", type=float, default=0.0)
    p.add_argument("--drop-path", "--drop_path", dest="drop_path", type=float, default=0.1, help="ViT only")
    p.add_argument("--init_scale", default=1.0, type=float, help="multiplies the new head's init")
    p.add_argument("--model-ema", "--model_ema", dest="model_ema", action="store_true")
    p.add_argument("--no-model-ema", "--no_model_ema", dest="model_ema", action="store_false")
    p.set_defaults(model_ema=True)
    p.add_argument("--model-ema-decay", "--model_ema_decay", dest="model_ema_decay", type=float, default=0.99996)
    p.add_argument("--model-ema-force-cpu", "--model_ema_force_cpu", dest="model_ema_force_cpu",
                   action="store_true", default=False)
    # optimiser
    p.add_argument("--opt", default="adamw", type=str, help="adamw, adam, sgd or momentum")
    p.add_argument("--opt-eps", "--opt_eps", dest="opt_eps", default=1e-8, type=float)
    p.add_argument("--opt-betas", "--opt_betas", dest="opt_betas", default=None, type=float, nargs="+")
    p.add_argument("--clip-grad", "--clip_grad", dest="clip_grad", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=0.05)
    # schedule
    p.add_argument("--sched", default="cosine", type=str, help="only 'cosine' is implemented")
    p.add_argument("--lr", type=float, default=1e-3 if semi else 5e-4, help="scaled by batch * world / 512")
    p.add_argument("--lr-noise", "--lr_noise", dest="lr_noise", type=float, nargs="+", default=None)
    p.add_argument("--lr-noise-pct", dest="lr_noise_pct", type=float, default=0.67)
    p.add_argument("--lr-noise-std", dest="lr_noise_std", type=float, default=1.0)
    p.add_argument("--warmup-lr", "--warmup_lr", dest="warmup_lr", type=float, default=1e-6)
    p.add_argument("--min-lr", "--min_lr", dest="min_lr", type=float, default=1e-5)
    p.add_argument("--decay-epochs", dest="decay_epochs", type=float, default=30)
    p.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=int, default=5)
    p.add_argument("--cooldown-epochs", dest="cooldown_epochs", type=int, default=10,
                   help="ignored by the loop, as in the reference")
    p.add_argument("--patience-epochs", dest="patience_epochs", type=int, default=10)
    p.add_argument("--decay-rate", "--dr", dest="decay_rate", type=float, default=0.1)
    # augmentation
    p.add_argument("--color-jitter", "--color_jitter", dest="color_jitter", type=float, default=0.4)
    p.add_argument("--aa", type=str, default="none" if semi else "rand-m9-mstd0.5-inc1")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--train-interpolation", "--train_interpolation", dest="train_interpolation", type=str,
                   default="bicubic")
    p.add_argument("--repeated-aug", "--repeated_aug", dest="repeated_aug", action="store_true")
    p.add_argument("--no-repeated-aug", "--no_repeated_aug", dest="repeated_aug", action="store_false")
    p.set_defaults(repeated_aug=True)
    p.add_argument("--reprob", type=float, default=0.25)
    p.add_argument("--remode", type=str, default="pixel")
    p.add_argument("--recount", type=int, default=1)
    p.add_argument("--resplit", action="store_true", default=False)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--cutmix-minmax", "--cutmix_minmax", dest="cutmix_minmax", type=float, nargs="+", default=None)
    p.add_argument("--mixup-prob", "--mixup_prob", dest="mixup_prob", type=float, default=1.0)
    p.add_argument("--mixup-switch-prob", "--mixup_switch_prob", dest="mixup_switch_prob", type=float, default=0.5)
    p.add_argument("--mixup-mode", "--mixup_mode", dest="mixup_mode", type=str, default="batch")
    # distillation (unused by the iBOT recipe)
    p.add_argument("--teacher-model", dest="teacher_model", default="self" if semi else "regnety_160", type=str)
    p.add_argument("--teacher-path", dest="teacher_path", type=str, default="")
    p.add_argument("--distillation-type", dest="distillation_type", default="none",
                   choices=["none", "soft", "hard"], type=str)
    p.add_argument("--distillation-alpha", dest="distillation_alpha", default=0.5, type=float)
    p.add_argument("--distillation-tau", dest="distillation_tau", default=1.0, type=float)
    # other
    p.add_argument("--finetune", default="", help="broken in the reference; refused here (use --pretrained_weights)")
    p.add_argument("--disable_weight_decay_on_bias_norm", action="store_true", default=False, help="unused")
    p.add_argument("--data_set", default="IMNET", choices=DATA_SETS, type=str)
    p.add_argument("--inat-category", "--inat_category", dest="inat_category", default="name",
                   choices=["kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name"])
    p.add_argument("--output_dir", default="", help="where to save checkpoints and log.txt")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu is used when CUDA is absent)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="checkpoint to resume from")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--eval", action="store_true", help="evaluation only")
    p.add_argument("--dist-eval", "--dist_eval", dest="dist_eval", action="store_true", default=False)
    p.add_argument("--pin-mem", "--pin_mem", dest="pin_mem", action="store_true")
    p.add_argument("--no-pin-mem", "--no_pin_mem", dest="pin_mem", action="store_false")
    p.set_defaults(pin_mem=True)
    p.add_argument("--no_amp", action="store_true", help="(extension) disable mixed precision")
    p.add_argument("--print_freq", default=10, type=int)
    p.add_argument("--world_size", default=1, type=int)
    if semi:
        p.add_argument("--finetune_head_layer", default=0, type=int, choices=[0, 1, 2, 3],
                       help="layers of the pretrained projection head kept on top of the backbone")
        p.add_argument("--out_dim", default=8192, type=int, help="output dim of the pretrained head")
        p.add_argument("--distill_epochs", default=150, type=int, help="unused (as in the reference)")
        p.add_argument("--layer_decay", default=1.0, type=float, help="unused (as in the reference)")
        p.add_argument("--disable_weight_decay_on_cls_pos", action="store_true", help="unused")
        p.add_argument("--disable_weight_decay_on_rel_pos_bias", action="store_true", help="unused")
        p.add_argument("--layer_scale_init_value", default=0.0, type=float, help="unused")
    return p


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def _pil_loader(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class ListDataset(torch.utils.data.Dataset):
    """(path, label) samples read with PIL (RGB)."""

    def __init__(self, samples, nb_classes, transform=None):
        self.samples, self.nb_classes, self.transform = samples, nb_classes, transform
        self.targets = [t for _, t in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = _pil_loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def cars_samples(root, train):
    """Stanford Cars from ``cars_annos.mat``: 196 classes, label = class - 1, split by ``test``."""
    from scipy.io import loadmat
    annos = loadmat(os.path.join(root, "cars_annos.mat"))["annotations"][0]
    samples = []
    for a in annos:
        rel = str(a["relative_im_path"][0]) if "relative_im_path" in a.dtype.names else str(a[0][0])
        cls = int(a["class"][0][0]) if "class" in a.dtype.names else int(a[5][0][0])
        test = int(a["test"][0][0]) if "test" in a.dtype.names else int(a[6][0][0])
        if bool(test) != (not train):
            continue
        samples.append((os.path.join(root, rel), cls - 1))
    return samples, 196


def flowers_samples(root, train):
    """Flowers-102: train = trnid ∪ valid, test = tstid; labels shifted to 0-based; 102 classes."""
    from scipy.io import loadmat
    labels = loadmat(os.path.join(root, "imagelabels.mat"))["labels"].reshape(-1)
    setid = loadmat(os.path.join(root, "setid.mat"))
    ids = list(setid["trnid"].reshape(-1)) + list(setid["valid"].reshape(-1)) if train \
        else list(setid["tstid"].reshape(-1))
    samples = [(os.path.join(root, "jpg", f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1) for i in ids]
    return samples, 102


def inat_samples(root, train, year, category):
    """iNaturalist 2018/2019 (DeiT ``INatDataset``): labels index the ``category`` values in the
    order they first appear in the ``train{year}.json`` annotations."""
    with open(os.path.join(root, f"{'train' if train else 'val'}{year}.json")) as f:
        data = json.load(f)
    with open(os.path.join(root, "categories.json")) as f:
        data_catg = json.load(f)
    with open(os.path.join(root, f"train{year}.json")) as f:
        data_for_targeter = json.load(f)
    targeter = {}
    for elem in data_for_targeter["annotations"]:
        king = data_catg[int(elem["category_id"])][category]
        if king not in targeter:
            targeter[king] = len(targeter)
    samples = []
    for elem in data["images"]:
        cut = elem["file_name"].split("/")
        target_current = int(cut[2])
        path = os.path.join(root, elem["file_name"])
        if not os.path.exists(path):
            path = os.path.join(root, cut[0], cut[2], cut[3])
        samples.append((path, targeter[data_catg[target_current][category]]))
    return samples, len(targeter)


def build_transform(is_train, args):
    """DeiT ``build_transform``: eval resize int(256/224 × size), bicubic. ImageNet mean/std."""
    return build_finetune_transform(is_train, args, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                    lambda size: int((256 / 224) * size), transforms.InterpolationMode.BICUBIC)


def build_dataset(is_train, args):
    """Returns ``(dataset, nb_classes)`` for ``args.data_set``."""
    transform = build_transform(is_train, args)
    name = args.data_set
    if name == "CIFAR":
        return datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False), 100
    if name == "CIFAR10":
        return datasets.CIFAR10(args.data_path, train=is_train, transform=transform, download=False), 10
    if name in ("IMNET", "folder", "image_folder"):
        ds = datasets.ImageFolder(os.path.join(args.data_path, "train" if is_train else "val"), transform=transform)
        return ds, len(ds.classes)
    if name in ("INAT", "INAT19"):
        samples, n = inat_samples(args.data_path, is_train, 2018 if name == "INAT" else 2019, args.inat_category)
    elif name == "Cars":
        samples, n = cars_samples(args.data_path, is_train)
    elif name == "Flwrs":
        samples, n = flowers_samples(args.data_path, is_train)
    else:
        raise ValueError(f"unknown data set {name}")
    return ListDataset(samples, n, transform), n


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

class BackboneWithHead(nn.Module):
    """``head(backbone(x))``: the backbone returns the [CLS] (or mean-pooled) feature (B, D)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))


def build_finetune_backbone(args):
    """Registry backbone of ``args.arch`` without head, with the recipe's dropouts (ViT: drop path and
    ``--avgpool_patchtokens 1`` = mean pooling + ``fc_norm``). Returns ``(backbone, feature dim D)``."""
    if model_family(args.arch) == "swin":
        backbone = create_backbone(args.arch, window_size=args.window_size, num_classes=0,
                                   drop_rate=args.drop, attn_drop_rate=args.attn_drop_rate)
    else:
        backbone = create_backbone(args.arch, patch_size=args.patch_size, img_size=[args.input_size], num_classes=0,
                                   drop_path_rate=args.drop_path, drop_rate=args.drop,
                                   attn_drop_rate=args.attn_drop_rate, use_mean_pooling=args.avgpool_patchtokens == 1)
    return backbone, backbone.num_features


def new_linear_head(in_dim, nb_classes, init_scale=1.0):
    """New ``Linear(in_dim, nb_classes)``: weight ~ truncated normal (std 0.02) × ``init_scale``, bias 0."""
    head = nn.Linear(in_dim, nb_classes)
    trunc_normal_(head.weight, std=.02)
    nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.weight.mul_(init_scale)
    return head


def build_model(args, nb_classes, checkpoint_key):
    """Backbone + pretrained weights, then a new Linear head (the reference's order)."""
    backbone, dim = build_finetune_backbone(args)
    load_pretrained_weights(backbone, args.pretrained_weights, checkpoint_key, args.arch, args.patch_size)
    return BackboneWithHead(backbone, new_linear_head(dim, nb_classes, args.init_scale))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def _check_args(args):
    if args.finetune:
        raise SystemExit("--finetune is broken in the reference and not supported; pass the weights with "
                         "--pretrained_weights (and --checkpoint_key)")
    if args.sched != "cosine":
        raise SystemExit(f"--sched {args.sched} is not implemented; only the cosine schedule of the recipe is")
    if args.lr_noise:
        raise SystemExit("--lr-noise is not implemented")
    if args.distillation_type != "none":
        raise SystemExit("distillation is not part of the iBOT recipe and is not implemented; use "
                         "--distillation-type none")


def setup_run(args):
    requested = str(args.device)
    ibot_dist.init_distributed_mode(args)
    device = args.device if isinstance(args.device, torch.device) else torch.device(args.device)
    if requested.startswith("cpu"):
        device = torch.device("cpu")
    args.device = str(device)  # plain args: checkpoints load with weights-only unpickling
    print_run_header(args)
    return device


def run_one_key(args, checkpoint_key, device, build_model_fn):
    """Fine-tune for one ``checkpoint_key``; returns ``{'max_accuracy': ...}`` or the eval stats."""
    use_amp = device.type == "cuda" and not args.no_amp
    fix_random_seeds(args.seed + ibot_dist.get_rank())
    cudnn.benchmark = True

    dataset_train, nb_classes = build_dataset(True, args)
    dataset_val, _ = build_dataset(False, args)
    args.nb_classes = nb_classes
    world, rank = ibot_dist.get_world_size(), ibot_dist.get_rank()
    if args.repeated_aug:
        sampler_train = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                            shuffle=True)
    if args.dist_eval and world > 1:
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=world, rank=rank, shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    pin = args.pin_mem and device.type == "cuda"
    data_loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train,
                                                    batch_size=args.batch_size, num_workers=args.num_workers,
                                                    pin_memory=pin, drop_last=True)
    data_loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val,
                                                  batch_size=int(1.5 * args.batch_size),
                                                  num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    if len(data_loader_train) == 0 and not args.eval:
        raise ValueError(f"no full training batch: {len(sampler_train)} samples per rank for batch size "
                         f"{args.batch_size}")

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)

    model = build_model_fn(args, nb_classes, checkpoint_key)
    model.to(device)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")

    linear_scaled_lr = args.lr * args.batch_size * world / 512.0
    args.lr = linear_scaled_lr
    groups = param_groups_layer_decay(model_without_ddp, weight_decay=args.weight_decay, skip_list=())
    betas = tuple(args.opt_betas) if args.opt_betas else (0.9, 0.999)
    opt = args.opt.lower()
    if opt == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps, betas=betas)
    elif opt == "adam":
        optimizer = torch.optim.Adam(groups, lr=args.lr, eps=args.opt_eps, betas=betas)
    elif opt in ("sgd", "momentum"):
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=opt == "sgd")
    else:
        raise SystemExit(f"--opt {args.opt} is not supported (adamw, adam, sgd, momentum)")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    loss_scaler = GradScalerWithNorm(device, enabled=use_amp)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    ckpt_name = f"checkpoint_{checkpoint_key}_cls.pth"
    max_accuracy = 0.0
    if args.resume:
        args.start_epoch, ckpt = load_checkpoint_for_resume(
            args.resume, model_without_ddp, None if args.eval else optimizer, loss_scaler, model_ema)
        max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        print(f"Resuming at epoch {args.start_epoch}")

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, use_amp=use_amp, print_freq=args.print_freq)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        lr = epoch_cosine_value(max(epoch - 1, 0), args.lr, args.min_lr, args.epochs, args.warmup_epochs,
                                args.warmup_lr)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                      args.clip_grad, model_ema, mixup_fn, use_amp=use_amp,
                                      print_freq=args.print_freq)
        test_stats = evaluate(data_loader_val, model, device, use_amp=use_amp, print_freq=args.print_freq)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        if test_stats["acc1"] >= max_accuracy:
            max_accuracy = test_stats["acc1"]
            if args.output_dir:
                save_checkpoint(os.path.join(args.output_dir, ckpt_name), model_without_ddp, optimizer, epoch,
                                loss_scaler, args, model_ema, lr_scheduler={"last_epoch": epoch},
                                max_accuracy=max_accuracy)
        print(f"Max accuracy: {max_accuracy:.2f}%")
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        save_json_log(args.output_dir, log_stats)
        barrier()
    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    return {"max_accuracy": max_accuracy}


def run_transfer(args, build_model_fn=build_model):
    """Fine-tune (or, with ``--eval``, evaluate) every key of ``args.checkpoint_key`` (comma list), each
    with ``build_model_fn(args, nb_classes, key)``. Returns ``{key: {'max_accuracy': ...} or eval stats}``."""
    _check_args(args)
    device = setup_run(args)
    results = {}
    for key in [k.strip() for k in args.checkpoint_key.split(",") if k.strip()]:
        results[key] = run_one_key(copy.deepcopy(args), key, device, build_model_fn)
    return results
