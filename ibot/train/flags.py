"""Command-line flags of ``main_ibot.py`` (official names, types and defaults) and their validation."""
import argparse
import math
import os

from ibot.models import arch_choices, is_model, resolve_name
from ibot.models.swin_transformer import check_swin_args

from ibot.data.masking import check_mask_args
from ibot.utils.misc import bool_flag
from ibot.train.periodic_eval import check_eval_args



def get_args_parser():
    """The official ``iBOT`` parser (``add_help=False``, used as a parent), plus this repository's additions."""
    parser = argparse.ArgumentParser("iBOT", add_help=False)

    # Model parameters
    parser.add_argument("--arch", default="vit_small", type=str, choices=arch_choices(aliases=True),
                        help="Name of the backbone; deit_* are aliases of vit_*.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="ViT patch size in pixels. For Swin it only sets the mask cell (8 × patch_size): use 4.")
    parser.add_argument("--window_size", default=7, type=int, help="Swin window size (ignored by ViT).")
    parser.add_argument("--out_dim", default=8192, type=int, help="Dimensionality of the [CLS] head output (K).")
    parser.add_argument("--patch_out_dim", default=8192, type=int,
                        help="Dimensionality of the patch head output when the heads are not shared.")
    parser.add_argument("--shared_head", default=False, type=bool_flag,
                        help="Student: reuse the [CLS] head's last layer for patch tokens.")
    parser.add_argument("--shared_head_teacher", default=True, type=bool_flag,
                        help="Teacher: reuse the [CLS] head's last layer for patch tokens.")
    parser.add_argument("--norm_last_layer", default=True, type=bool_flag,
                        help="Student: fix the weight-norm gain of the last layer(s) at 1.")
    parser.add_argument("--momentum_teacher", default=0.996, type=float,
                        help="Base EMA momentum of the teacher, cosine-increased to 1.")
    parser.add_argument("--norm_in_head", default=None,
                        help="Normalisation inside the projection head MLP: bn, syncbn, ln, or unset.")
    parser.add_argument("--act_in_head", default="gelu", help="Activation inside the head MLP: gelu or relu.")
    parser.add_argument("--use_masked_im_modeling", default=True, type=bool_flag,
                        help="Mask the student's global crops (masked image modeling).")
    parser.add_argument("--pred_ratio", default=0.3, type=float, nargs="+",
                        help="Masking ratio(s); with several values one is drawn per crop.")
    parser.add_argument("--pred_ratio_var", default=0, type=float, nargs="+",
                        help="Half-width of the uniform jitter around each masking ratio.")
    parser.add_argument("--pred_shape", default="block", type=str, help="Mask shape: block or rand.")
    parser.add_argument("--pred_start_epoch", default=0, type=int,
                        help="Epochs without masking at the start; also delays the patch temperature warm-up.")
    parser.add_argument("--lambda1", default=1.0, type=float, help="Weight of the [CLS] (self-distillation) loss.")
    parser.add_argument("--lambda2", default=1.0, type=float, help="Weight of the masked patch (MIM) loss.")

    # Temperature teacher parameters
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                        help="Teacher [CLS] temperature at the start of its warm-up.")
    parser.add_argument("--teacher_temp", default=0.04, type=float, help="Teacher [CLS] temperature after warm-up.")
    parser.add_argument("--warmup_teacher_patch_temp", default=0.04, type=float,
                        help="Teacher patch temperature at the start of its warm-up.")
    parser.add_argument("--teacher_patch_temp", default=0.07, type=float,
                        help="Teacher patch temperature after warm-up.")
    parser.add_argument("--warmup_teacher_temp_epochs", default=30, type=int,
                        help="Number of warm-up epochs of both teacher temperatures.")

    # Training/Optimization parameters
    parser.add_argument("--use_fp16", type=bool_flag, default=True,
                        help="Mixed precision (fp16 autocast + GradScaler) on GPUs; see --precision.")
    parser.add_argument("--weight_decay", type=float, default=0.04, help="Initial weight decay.")
    parser.add_argument("--weight_decay_end", type=float, default=0.4, help="Final weight decay (cosine schedule).")
    parser.add_argument("--clip_grad", type=float, default=3.0,
                        help="Maximal gradient norm of each parameter tensor; 0 disables clipping.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process and step.")
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--freeze_last_layer", default=1, type=int,
                        help="Epochs during which the head's last layer(s) are not updated.")
    parser.add_argument("--lr", default=0.0005, type=float,
                        help="Peak learning rate for a total batch of 256 (linearly scaled).")
    parser.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up.")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="Final learning rate of the cosine schedule.")
    parser.add_argument("--optimizer", default="adamw", type=str, choices=["adamw", "sgd", "lars"],
                        help="Optimizer.")
    parser.add_argument("--load_from", default=None, help="Checkpoint to resume from (joined onto --output_dir).")
    parser.add_argument("--drop_path", type=float, default=0.1, help="Student ViT stochastic-depth rate.")

    # Multi-crop parameters
    parser.add_argument("--global_crops_number", type=int, default=2, help="Number of global crops (at least 2).")
    parser.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.14, 1.),
                        help="Scale range of the global crops (RandomResizedCrop).")
    parser.add_argument("--local_crops_number", type=int, default=0, help="Number of local crops; 0 disables them.")
    parser.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4),
                        help="Scale range of the local crops (RandomResizedCrop).")

    # Misc
    parser.add_argument("--data_path", default="/path/to/imagenet/train/", type=str,
                        help="Folder of training images (ImageFolder layout, or images directly).")
    parser.add_argument("--output_dir", default=".", type=str, help="Where checkpoints and logs go.")
    parser.add_argument("--config", default=None, type=str,
                        help="YAML file of flags (configs/*.yaml); flags on the command line override it. "
                             "The resolved flags are written to output_dir/args.json.")
    parser.add_argument("--saveckp_freq", default=40, type=int, help="Save checkpointNNNN.pth every x epochs.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers per process.")
    parser.add_argument("--dist_url", default="env://", type=str, help="init_method of the process group.")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Accepted for old launchers and ignored (torchrun sets LOCAL_RANK).")

    # ---- additions of this repository (defaults keep the official behaviour) ----
    parser.add_argument("--global_crops_size", default=224, type=int, help="Side of the global crops in pixels.")
    parser.add_argument("--local_crops_size", default=96, type=int, help="Side of the local crops in pixels.")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="Autocast precision. Default: fp16 when --use_fp16 is true and a GPU is used, else fp32.")
    parser.add_argument("--train_step", default="fast", choices=["fast", "reference"],
                        help="fast: heads on [CLS] and masked tokens only, no per-step host sync (same loss); "
                             "reference: the official computation.")
    parser.add_argument("--sample_seeding", default=True, type=bool_flag,
                        help="true: the crops and masks of a sample are drawn from RNGs seeded by (seed, epoch, "
                             "index), masks for the global crops only (independent of --num_workers, exact "
                             "resume). false: the official streams: the loader workers' global RNGs (worker "
                             "seeds drawn from the global torch RNG every epoch) and masks for every crop; "
                             "same distribution, other draws, and a resumed run no longer repeats them.")
    parser.add_argument("--center2_tokens", default="all", choices=["all", "masked"],
                        help="Teacher patch centre over all patch tokens (official) or masked ones only (DINOv2).")
    parser.add_argument("--grad_checkpointing", default=False, type=bool_flag,
                        help="Activation checkpointing of the student backbone: each block keeps only its input "
                             "and its forward is recomputed in the backward pass (less activation memory, "
                             "~20-30%% more compute per step; same loss and gradients). The teacher runs without grad.")
    parser.add_argument("--head_hidden_dim", default=2048, type=int, help="Hidden width of the head MLP.")
    parser.add_argument("--head_bottleneck_dim", default=256, type=int, help="Bottleneck width of the head.")
    parser.add_argument("--print_freq", default=10, type=int,
                        help="Log (and read values back from the device) every N iterations.")
    parser.add_argument("--auto_resume", default=False, type=bool_flag,
                        help="Resume from <output_dir>/checkpoint.pth when it exists (it then wins over "
                             "--load_from); for jobs that are restarted with the same command line.")
    parser.add_argument("--save_every_iters", default=0, type=int,
                        help="Also write checkpoint.pth every N iterations inside an epoch (0: only at the end "
                             "of epochs); a resume from it skips the batches of the epoch already trained.")
    parser.add_argument("--keep_checkpoints", default=2, type=int,
                        help="Keep the N newest checkpoint.pth saves (older ones as checkpoint.pth.1, .2, ..., each "
                             "with a .sha256 checksum file); --auto_resume falls back to the newest intact one.")
    parser.add_argument("--dist_timeout", default=1800, type=float,
                        help="Seconds a collective may wait for the other processes before the run stops with "
                             "an error naming it (a stalled or dead rank), instead of hanging.")
    parser.add_argument("--skip_bad_images", default=False, type=bool_flag,
                        help="Replace unreadable/corrupt image files by the next sample (each is named in a "
                             "warning) instead of stopping with an error naming the file.")
    # small-image recipe (docs/small_image_recipe.md) and periodic evaluation
    parser.add_argument("--blur_radius_scale", default=1.0, type=float,
                        help="Multiply every Gaussian-blur radius of the multi-crop augmentation (1.0 = official; "
                             "0 disables blurring).")
    parser.add_argument("--koleo_loss_weight", default=0.0, type=float,
                        help="Weight of DINOv2's KoLeo regulariser on the student's backbone [CLS] features of "
                             "each global crop (0 = off = official iBOT; DINOv2 uses 0.1). Spreads the features "
                             "over the sphere; needs at least 2 images per process.")
    parser.add_argument("--data_pipeline", default="pil", choices=["pil", "fast", "device"],
                        help="How the multi-crop augmentation is computed (docs/data_pipeline.md): pil = the "
                             "official PIL pipeline in the workers; fast = the same random parameters, faster "
                             "CPU operations (uint8 resize, OpenCV hue and blur; pixels within a few 8-bit "
                             "levels), normalised on the device; device = the workers only crop (uint8), the "
                             "colour operations run batched on the training device.")
    parser.add_argument("--color_jitter_scale", default=1.0, type=float,
                        help="Multiply the colour-jitter strengths (brightness 0.4, contrast 0.4, saturation 0.2, "
                             "hue 0.1; hue capped at 0.5) of the multi-crop augmentation (1.0 = official).")
    parser.add_argument("--eval_every", default=0, type=int,
                        help="Run the k-NN protocol of eval_knn.py on --eval_data_path every N epochs and after "
                             "the last one (0: never); results go to log.txt and TensorBoard.")
    parser.add_argument("--eval_data_path", default="", type=str,
                        help="Labelled folder with train/ and val/ for --eval_every.")
    parser.add_argument("--eval_keys", default="teacher,student", type=str,
                        help="Backbones evaluated by --eval_every: teacher, student or teacher,student.")
    parser.add_argument("--eval_nb_knn", default=[20], type=int, nargs="+", help="k values of --eval_every.")
    parser.add_argument("--eval_temperature", default=0.07, type=float, help="k-NN voting temperature.")
    parser.add_argument("--eval_resize_size", default=256, type=int,
                        help="Evaluation resize (shorter side, bicubic), as eval_knn.py --resize_size.")
    parser.add_argument("--eval_crop_size", default=224, type=int,
                        help="Evaluation centre crop, as eval_knn.py --crop_size.")
    parser.add_argument("--eval_batch_size", default=128, type=int, help="Images per process and evaluation batch.")
    parser.add_argument("--eval_num_workers", default=2, type=int, help="Data loading workers of the evaluation.")
    return parser


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_args(args):
    """Return a list of messages for flag combinations that cannot train; each names the flag or path."""
    errors = []
    try:
        check_mask_args(args.pred_ratio, args.pred_ratio_var, args.pred_shape)
    except ValueError as err:
        errors.append(str(err))
    if args.epochs < args.warmup_teacher_temp_epochs + args.pred_start_epoch:
        errors.append(f"--epochs ({args.epochs}) is shorter than --warmup_teacher_temp_epochs "
                      f"({args.warmup_teacher_temp_epochs}) + --pred_start_epoch ({args.pred_start_epoch})")
    if args.global_crops_number < 2:
        errors.append(f"--global_crops_number must be at least 2 (got {args.global_crops_number}): "
                      "the [CLS] loss compares different global views")
    if args.local_crops_number < 0:
        errors.append("--local_crops_number must be >= 0")
    for flag in ("global_crops_scale", "local_crops_scale"):
        scale = _as_list(getattr(args, flag))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            errors.append(f"--{flag} needs two values 0 < min <= max <= 1, got {scale}")
    if "swin" in args.arch:
        errors += check_swin_args(args.patch_size, args.window_size, args.global_crops_size,
                                  args.local_crops_size, args.local_crops_number)
    else:
        for flag in ("global_crops_size", "local_crops_size"):
            size = getattr(args, flag)
            if flag == "local_crops_size" and args.local_crops_number == 0:
                continue
            if size <= 0 or size % args.patch_size:
                errors.append(f"--{flag} {size} is not a multiple of the patch size (--patch_size {args.patch_size})")
    if args.norm_in_head not in (None, "bn", "syncbn", "ln"):
        errors.append(f"--norm_in_head {args.norm_in_head!r} is not supported (bn, syncbn, ln or unset)")
    if args.act_in_head not in ("gelu", "relu"):
        errors.append(f"--act_in_head must be gelu or relu, got {args.act_in_head!r}")
    if args.batch_size_per_gpu < 1:
        errors.append("--batch_size_per_gpu must be at least 1")
    patch_dim_student = args.out_dim if args.shared_head else args.patch_out_dim
    patch_dim_teacher = args.out_dim if args.shared_head_teacher else args.patch_out_dim
    if patch_dim_student != patch_dim_teacher:
        errors.append(f"student and teacher patch outputs differ ({patch_dim_student} vs {patch_dim_teacher}): "
                      "with --shared_head_teacher true (default) and --shared_head false, "
                      "--patch_out_dim must equal --out_dim")
    if args.epochs < 1:
        errors.append(f"--epochs must be at least 1 (got {args.epochs})")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        errors.append(f"--warmup_epochs ({args.warmup_epochs}) must be between 0 and --epochs ({args.epochs})")
    if args.freeze_last_layer < 0:
        errors.append(f"--freeze_last_layer must be >= 0 (got {args.freeze_last_layer})")
    for flag in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "drop_path"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0:
            errors.append(f"--{flag} must be a finite number >= 0 (got {value})")
    if not 0 <= args.momentum_teacher <= 1:
        errors.append(f"--momentum_teacher must be in [0, 1] (got {args.momentum_teacher})")
    for flag in ("warmup_teacher_temp", "teacher_temp", "warmup_teacher_patch_temp", "teacher_patch_temp"):
        if not getattr(args, flag) > 0:
            errors.append(f"--{flag} must be > 0 (got {getattr(args, flag)})")
    for flag, low in (("num_workers", 0), ("saveckp_freq", 0), ("save_every_iters", 0), ("print_freq", 1),
                      ("keep_checkpoints", 1)):
        if getattr(args, flag) < low:
            errors.append(f"--{flag} must be >= {low} (got {getattr(args, flag)})")
    if not args.data_path or not os.path.isdir(args.data_path):
        errors.append(f"--data_path {args.data_path!r} is not a folder")
    if not args.dist_timeout > 0:
        errors.append(f"--dist_timeout must be > 0 seconds (got {args.dist_timeout})")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        errors.append(f"--output_dir {args.output_dir!r} exists and is not a folder")
    for flag in ("blur_radius_scale", "color_jitter_scale", "koleo_loss_weight"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0:
            errors.append(f"--{flag} must be a finite number >= 0 (got {value})")
    if args.koleo_loss_weight > 0 and args.batch_size_per_gpu < 2:
        errors.append("--koleo_loss_weight needs --batch_size_per_gpu >= 2 (nearest neighbours within a batch)")
    if getattr(args, "data_pipeline", "pil") == "fast":
        try:
            import cv2  # noqa: F401
        except ImportError:
            errors.append("--data_pipeline fast needs OpenCV: pip install opencv-python-headless")
    errors += check_eval_args(args)
    return errors


def parser_defaults():
    """``{flag dest: default}`` of :func:`get_args_parser`: the only place defaults are written."""
    parser = get_args_parser()
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def complete_args(args):
    """A copy of ``args`` with every flag the parser knows and ``args`` lacks set to its default (a
    Namespace from an older checkpoint, or built by hand), and ``--arch`` resolved through the
    registry (``deit_*`` -> ``vit_*``, as the official code rewrites it). ``args`` is not modified."""
    values = {**parser_defaults(), **vars(args)}
    if values.get("arch") and is_model(values["arch"]):
        values["arch"] = resolve_name(values["arch"])
    return argparse.Namespace(**values)
