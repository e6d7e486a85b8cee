"""ImageNet full fine-tuning with layer-wise lr decay (BEiT recipe; spec ``evaluation.md`` §2.5).

run.sh invocation (``imagenet_cls``)::

    python -m torch.distributed.run --nproc_per_node=8 \
        evaluation/classification_layer_decay/run_class_finetuning.py \
        --finetune backbone.pth --model vit_base --epochs 100 --warmup_epochs 20 --layer_decay 0.65 \
        --mixup 0.8 --cutmix 1.0 --layer_scale_init_value 0.0 --disable_rel_pos_bias --abs_pos_emb \
        --use_cls --imagenet_default_mean_and_std --output_dir OUT --data_path data/imagenet \
        --batch_size 128 --lr 4e-3 --model_key model|module --model_prefix ''

Recipe: timm ``create_transform`` (RandomResizedCrop bicubic, flip, RandAugment
``rand-m9-mstd0.5-inc1``, RandomErasing 0.25 pixel mode), timm ``Mixup``/CutMix with label
smoothing and ``SoftTargetCrossEntropy`` (else label-smoothing CE, else CE), AdamW with layer-wise
lr decay groups (``ibot.eval.finetune``), per-step linear warm-up from 0 + cosine to ``--min_lr``,
cosine weight-decay schedule, drop path, gradient accumulation (``--update_freq``), optional model
EMA (``timm.utils.ModelEmaV3``), top-1/top-5 evaluation every epoch.

Outputs in ``--output_dir``: ``checkpoint-<epoch>.pth`` + ``checkpoint.pth`` every
``save_ckpt_freq`` epochs and at the last epoch, ``checkpoint-best.pth`` (+ ``checkpoint.pth``) when
val top-1 improves strictly, one JSON line per epoch in ``log.txt``. Checkpoints hold ``model``,
``optimizer``, ``epoch``, ``scaler``, ``args`` (+ ``model_ema``, ``max_accuracy``) and are written
atomically; ``--resume`` / ``--auto_resume`` continue at the next epoch (weights-only loading).

Deviations from the reference:
- no DeepSpeed and no apex: ``--enable_deepspeed`` is refused with a clear message; mixed precision
  is native ``torch.autocast`` (fp16 on CUDA, off on CPU) with ``torch.amp.GradScaler``;
- runs on CPU (gloo) as well as under ``torchrun`` with NCCL;
- ``--finetune`` also accepts a ``{'state_dict': ...}`` backbone file and ``module.``/``backbone.``
  prefixed keys without extra flags, and fails when backbone weights are missing (see
  ``modeling_finetune.load_finetune_checkpoint``);
- for ``IMNET``/``image_folder`` the number of classes is read from the folder (1000 for ImageNet);
- ``--log_dir`` (tensorboard) is accepted but unused: the JSON ``log.txt`` is the record;
- ``--auto_resume`` is off by default, as the spec states.
"""
import argparse
import datetime
import glob
import os
import re
import time

import torch
import torch.backends.cudnn as cudnn
from torchvision import datasets, transforms
from timm.data import Mixup
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD)
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ibot.eval import beit_vit
from ibot.eval.finetune import (GradScalerWithNorm, barrier, build_finetune_transform, evaluate,
                                load_checkpoint_for_resume, save_checkpoint, save_json_log, train_one_epoch)
from ibot.eval.flags import data_parser, launch_parser
from ibot.eval.layer_decay import create_layer_decay_optimizer
from ibot.train.schedules import cosine_scheduler
from ibot.utils import distributed as ibot_dist
from ibot.utils.misc import fix_random_seeds, print_run_header


def get_args_parser():
    p = argparse.ArgumentParser("BEiT-style fine-tuning with layer decay", add_help=False, parents=[
        data_parser(data_path="data/imagenet", batch_size=128, batch_flag="--batch_size", num_workers=10),
        launch_parser(local_rank=-1)])
    # run
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")
    p.add_argument("--save_ckpt_freq", default=100, type=int,
                   help="in percent of --epochs (rescaled to int(freq * epochs / 100))")
    # model
    p.add_argument("--model", default="deit_base_patch16_224", type=str, help="vit_tiny/small/base/large")
    p.add_argument("--patch_size", default=16, type=int, help="(extension) patch size of the ViT")
    p.add_argument("--rel_pos_bias", action="store_true")
    p.add_argument("--disable_rel_pos_bias", action="store_false", dest="rel_pos_bias")
    p.set_defaults(rel_pos_bias=True)
    p.add_argument("--abs_pos_emb", action="store_true")
    p.set_defaults(abs_pos_emb=False)
    p.add_argument("--learned_abs_pos_emb", action="store_true")
    p.add_argument("--disable_learned_abs_pos_emb", action="store_false", dest="learned_abs_pos_emb")
    p.set_defaults(learned_abs_pos_emb=True)
    p.add_argument("--layer_scale_init_value", default=0.1, type=float, help="0 disables layer scale")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--attn_drop_rate", type=float, default=0.0)
    p.add_argument("--drop_path", type=float, default=0.1)
    p.add_argument("--disable_eval_during_finetuning", action="store_true", default=False)
    p.add_argument("--model_ema", action="store_true", default=False)
    p.add_argument("--model_ema_decay", type=float, default=0.9999)
    p.add_argument("--model_ema_force_cpu", action="store_true", default=False)
    # optimiser
    p.add_argument("--opt", default="adamw", type=str)
    p.add_argument("--opt_eps", default=1e-8, type=float)
    p.add_argument("--opt_betas", default=None, type=float, nargs="+")
    p.add_argument("--clip_grad", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--weight_decay_end", type=float, default=None, help="cosine end value (default: constant)")
    p.add_argument("--lr", type=float, default=4e-3, help="absolute lr (not batch-scaled)")
    p.add_argument("--layer_decay", type=float, default=0.9)
    p.add_argument("--warmup_lr", type=float, default=1e-6, help="unused by the step schedule (as in the reference)")
    p.add_argument("--min_lr", type=float, default=1e-6)
    p.add_argument("--warmup_epochs", type=int, default=20)
    p.add_argument("--warmup_steps", type=int, default=-1, help="overrides --warmup_epochs when > 0")
    p.add_argument("--disable_weight_decay_on_rel_pos_bias", action="store_true", default=False)
    # augmentation
    p.add_argument("--color_jitter", type=float, default=0.4)
    p.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--train_interpolation", type=str, default="bicubic")
    p.add_argument("--crop_pct", type=float, default=None)
    p.add_argument("--reprob", type=float, default=0.25)
    p.add_argument("--remode", type=str, default="pixel")
    p.add_argument("--recount", type=int, default=1)
    p.add_argument("--resplit", action="store_true", default=False)
    p.add_argument("--mixup", type=float, default=0)
    p.add_argument("--cutmix", type=float, default=0)
    p.add_argument("--cutmix_minmax", type=float, nargs="+", default=None)
    p.add_argument("--mixup_prob", type=float, default=1.0)
    p.add_argument("--mixup_switch_prob", type=float, default=0.5)
    p.add_argument("--mixup_mode", type=str, default="batch")
    # fine-tuning weights
    p.add_argument("--finetune", default="", help="pretrained backbone file")
    p.add_argument("--model_key", default="model|module", type=str)
    p.add_argument("--model_prefix", default="", type=str)
    p.add_argument("--init_scale", default=0.001, type=float)
    p.add_argument("--use_mean_pooling", action="store_true")
    p.set_defaults(use_mean_pooling=True)
    p.add_argument("--use_cls", action="store_false", dest="use_mean_pooling")
    # data
    p.add_argument("--eval_data_path", default=None, type=str)
    p.add_argument("--nb_classes", default=0, type=int, help="0: from the data set")
    p.add_argument("--imagenet_default_mean_and_std", default=False, action="store_true")
    p.add_argument("--data_set", default="IMNET", choices=["CIFAR", "IMNET", "image_folder"], type=str)
    p.add_argument("--output_dir", default="", help="where to save checkpoints and log.txt")
    p.add_argument("--log_dir", default=None, help="accepted for compatibility; unused")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu is used when CUDA is absent)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--resume", default="", help="checkpoint to resume from")
    p.add_argument("--auto_resume", action="store_true")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume")
    p.set_defaults(auto_resume=False)
    p.add_argument("--save_ckpt", action="store_true")
    p.add_argument("--no_save_ckpt", action="store_false", dest="save_ckpt")
    p.set_defaults(save_ckpt=True)
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--eval", action="store_true", help="evaluation only")
    p.add_argument("--dist_eval", action="store_true", default=False)
    p.add_argument("--pin_mem", action="store_true")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    p.add_argument("--no_amp", action="store_true", help="(extension) disable mixed precision")
    p.add_argument("--print_freq", default=10, type=int)
    # distributed
    p.add_argument("--world_size", default=1, type=int)
    p.add_argument("--dist_on_itp", action="store_true")
    p.add_argument("--enable_deepspeed", action="store_true", default=False)
    return p


def build_transform(is_train, args):
    """Official BEiT ``build_transform`` (spec §2.5 "Procedure"): eval resize ``input_size / crop_pct``
    (bilinear); Inception mean/std unless ``--imagenet_default_mean_and_std``."""
    mean = IMAGENET_DEFAULT_MEAN if args.imagenet_default_mean_and_std else IMAGENET_INCEPTION_MEAN
    std = IMAGENET_DEFAULT_STD if args.imagenet_default_mean_and_std else IMAGENET_INCEPTION_STD
    if not is_train and args.crop_pct is None:
        args.crop_pct = 224 / 256 if args.input_size < 384 else 1.0
    return build_finetune_transform(is_train, args, mean, std, lambda size: int(size / args.crop_pct),
                                    transforms.InterpolationMode.BILINEAR)


def build_dataset(is_train, args):
    transform = build_transform(is_train, args)
    if args.data_set == "CIFAR":
        dataset = datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        nb_classes = 100
    elif args.data_set == "IMNET":
        root = os.path.join(args.data_path, "train" if is_train else "val")
        dataset = datasets.ImageFolder(root, transform=transform)
        nb_classes = len(dataset.classes)
    else:
        root = args.data_path if is_train else (args.eval_data_path or args.data_path)
        dataset = datasets.ImageFolder(root, transform=transform)
        nb_classes = len(dataset.classes)
    return dataset, nb_classes


def setup_run(args):
    """Initialise distributed mode, print the git revision and args; return the torch device.

    ``--device cpu`` forces the CPU even when CUDA is present. ``args.device`` becomes a string so
    that the args stored in checkpoints load with weights-only unpickling.
    """
    requested = str(args.device)
    ibot_dist.init_distributed_mode(args)
    device = args.device if isinstance(args.device, torch.device) else torch.device(args.device)
    if requested.startswith("cpu"):
        device = torch.device("cpu")
    args.device = str(device)
    print_run_header(args)
    return device


def _latest_checkpoint(output_dir):
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else ""


def main(args):
    if args.enable_deepspeed:
        raise SystemExit("--enable_deepspeed is not supported by this re-implementation: it uses native "
                         "torch.autocast + GradScaler; drop the flag (use --update_freq for accumulation)")
    device = setup_run(args)
    use_amp = device.type == "cuda" and not args.no_amp

    fix_random_seeds(args.seed + ibot_dist.get_rank())
    cudnn.benchmark = True

    dataset_train, nb_classes = build_dataset(is_train=True, args=args)
    dataset_val = None
    if not args.disable_eval_during_finetuning or args.eval:
        dataset_val, _ = build_dataset(is_train=False, args=args)
    if args.nb_classes <= 0:
        args.nb_classes = nb_classes
    elif args.nb_classes < nb_classes:
        raise ValueError(f"--nb_classes {args.nb_classes} < the {nb_classes} classes of the data set")

    world, rank = ibot_dist.get_world_size(), ibot_dist.get_rank()
    sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                        shuffle=True, seed=args.seed)
    pin = args.pin_mem and device.type == "cuda"
    data_loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=pin, drop_last=True, persistent_workers=False)
    data_loader_val = None
    if dataset_val is not None:
        if args.dist_eval and world > 1:
            if len(dataset_val) % world != 0:
                print("Warning: the val set is not divisible by the number of processes; duplicated "
                      "samples slightly change the result")
            sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=world, rank=rank,
                                                              shuffle=False)
        else:
            sampler_val = torch.utils.data.SequentialSampler(dataset_val)
        data_loader_val = torch.utils.data.DataLoader(
            dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
            num_workers=args.num_workers, pin_memory=pin, drop_last=False)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        print("Mixup is activated!")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)

    model = beit_vit.create_model(
        args.model, patch_size=args.patch_size, img_size=args.input_size, num_classes=args.nb_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, attn_drop_rate=args.attn_drop_rate,
        use_mean_pooling=args.use_mean_pooling, init_scale=args.init_scale, use_rel_pos_bias=args.rel_pos_bias,
        use_abs_pos_emb=args.abs_pos_emb, learned_abs_pos_emb=args.learned_abs_pos_emb,
        init_values=args.layer_scale_init_value)
    if args.finetune:
        beit_vit.load_finetune_checkpoint(model, args.finetune, args.model_key, args.model_prefix)
    model.to(device)

    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
        print(f"Using EMA with decay = {args.model_ema_decay:.8f}")

    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model = {model_without_ddp}")
    print(f"number of params: {n_parameters}")

    total_batch_size = args.batch_size * args.update_freq * world
    num_training_steps_per_epoch = len(dataset_train) // total_batch_size
    if num_training_steps_per_epoch == 0 and not args.eval:
        raise ValueError(f"the training set ({len(dataset_train)} images) is smaller than one step of "
                         f"{total_batch_size} images")
    print(f"LR = {args.lr:.8f}")
    print(f"Batch size = {total_batch_size}")
    print(f"Update frequent = {args.update_freq}")
    print(f"Number of training examples = {len(dataset_train)}")
    print(f"Number of training steps per epoch = {num_training_steps_per_epoch}")

    num_layers = model_without_ddp.get_num_layers()
    skip = set(model_without_ddp.no_weight_decay())
    if args.disable_weight_decay_on_rel_pos_bias:
        skip |= {n for n, _ in model_without_ddp.named_parameters() if "relative_position_bias_table" in n}
    layer_decay = args.layer_decay if args.layer_decay < 1.0 else None
    if layer_decay is not None:
        values = [args.layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
        print(f"Assigned values = {values}")
    optimizer = create_layer_decay_optimizer(args, model_without_ddp, layer_decay=layer_decay, skip_list=skip,
                                             num_layers=num_layers)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=True)
        model_without_ddp = model.module
    loss_scaler = GradScalerWithNorm(device, enabled=use_amp)

    print("Use step level LR scheduler!")
    lr_schedule_values = cosine_scheduler(args.lr, args.min_lr, args.epochs, num_training_steps_per_epoch,
                                          warmup_epochs=args.warmup_epochs, warmup_steps=args.warmup_steps)
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay
    wd_schedule_values = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                          num_training_steps_per_epoch)
    print(f"Max WD = {max(wd_schedule_values):.7f}, Min WD = {min(wd_schedule_values):.7f}")

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print(f"criterion = {criterion}")

    max_accuracy = 0.0
    resume = args.resume
    if not resume and args.auto_resume and args.output_dir:
        resume = _latest_checkpoint(args.output_dir)
    if resume:
        args.start_epoch, ckpt = load_checkpoint_for_resume(resume, model_without_ddp, optimizer, loss_scaler,
                                                            model_ema)
        max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        print(f"Resuming at epoch {args.start_epoch}")

    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, use_amp=use_amp, print_freq=args.print_freq)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    save_freq = max(1, int(args.save_ckpt_freq * args.epochs / 100))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler, args.clip_grad,
            model_ema, mixup_fn, lr_schedule_values=lr_schedule_values, wd_schedule_values=wd_schedule_values,
            start_steps=epoch * num_training_steps_per_epoch,
            num_training_steps_per_epoch=num_training_steps_per_epoch, update_freq=args.update_freq,
            use_amp=use_amp, print_freq=args.print_freq)

        def _save(name):
            save_checkpoint(os.path.join(args.output_dir, name), model_without_ddp, optimizer, epoch,
                            loss_scaler, args, model_ema, max_accuracy=max_accuracy)

        if args.output_dir and args.save_ckpt and ((epoch + 1) % save_freq == 0 or epoch + 1 == args.epochs):
            _save(f"checkpoint-{epoch}.pth")
            _save("checkpoint.pth")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        if data_loader_val is not None:
            test_stats = evaluate(data_loader_val, model, device, use_amp=use_amp, print_freq=args.print_freq)
            print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
            if max_accuracy < test_stats["acc1"]:
                max_accuracy = test_stats["acc1"]
                if args.output_dir and args.save_ckpt:
                    _save("checkpoint-best.pth")
                    _save("checkpoint.pth")
            print(f"Max accuracy: {max_accuracy:.2f}%")
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()}, "epoch": epoch,
                         "n_parameters": n_parameters}
        save_json_log(args.output_dir, log_stats)
        barrier()

    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    return {"max_accuracy": max_accuracy}


if __name__ == "__main__":
    parser = argparse.ArgumentParser("BEiT fine-tuning and evaluation script for image classification",
                                     parents=[get_args_parser()])
    main(parser.parse_args())
    ibot_dist.shutdown_distributed()
