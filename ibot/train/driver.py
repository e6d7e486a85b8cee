"""iBOT pre-training driver: data, networks, loss, optimiser and schedules, then the epochs.

Launch (see README for the recipes)::

    python main_ibot.py --data_path DIR --output_dir OUT ...                    # one process (GPU or CPU)
    python main_ibot.py --config configs/vit_small_800ep.yaml --data_path DIR --output_dir OUT
    torchrun --nproc_per_node 8 main_ibot.py --data_path DIR --output_dir OUT   # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr A --master_port 29500 main_ibot.py ...

:func:`train_ibot` reads top to bottom: validate the flags, set up the process (a
:class:`~ibot.train.context.RunContext`), build the data, the networks, the training step
(:class:`~ibot.train.step.iBOTTrainStep`) and the optimisation, resume (:class:`Checkpointer`), then
per epoch :func:`~ibot.train.epoch.run_epoch`, a checkpoint, the optional k-NN and the log line.
"""
import datetime
import json
import os
import time
from functools import partial

import torch
import torch.nn as nn

import ibot.models as models
from ibot.data.fast_augment import build_multicrop
from ibot.data.folders import BadImageError, ImageFolderMask
from ibot.models.head import iBOTHead
from ibot.models.wrapper import MultiCropWrapper
from ibot.train.context import make_context, saved_args
from ibot.train.epoch import run_epoch
from ibot.train.faults import (ResumableSampler, StepBoundaryLoader, StopOnSignal, TrainingInterrupted,
                               as_collective_timeout, as_worker_killed, capture_rng_state, restore_rng_state)
from ibot.train.flags import check_args, complete_args
from ibot.train.loss import iBOTLoss
from ibot.train.optim import build_optimizer, get_params_groups, has_batchnorms
from ibot.train.periodic_eval import PeriodicKNN, should_evaluate
from ibot.train.schedules import cosine_scheduler
from ibot.train.step import NonFiniteLossError, iBOTTrainStep
from ibot.utils import distributed as dist_utils
from ibot.train.run_lock import RunLock, RunLockError
from ibot.utils.checkpoint import (CorruptCheckpointError, load_newest_intact, remove_stale_temp_files,
                                   restart_from_checkpoint, rolling_checkpoints, save_checkpoint)
from ibot.utils.distributed import unwrap
from ibot.utils.misc import fix_random_seeds, print_run_header
from ibot.utils.resources import process_resources


class ConfigError(ValueError):
    """A flag, path or data problem found before training starts."""


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def mask_cell_size(args):
    """Mask cell in pixels: the patch size for ViT, the final-stage token (8 × patch_size) for Swin."""
    return 8 * args.patch_size if models.model_family(args.arch) == "swin" else args.patch_size


def build_dataset(args):
    """The pre-training ``ImageFolderMask`` with the multi-crop transform of the flags."""
    transform = build_multicrop(args.data_pipeline, args.global_crops_scale, args.local_crops_scale,
                                args.global_crops_number, args.local_crops_number, args.global_crops_size,
                                args.local_crops_size, blur_radius_scale=args.blur_radius_scale,
                                color_jitter_scale=args.color_jitter_scale)
    try:
        return ImageFolderMask(args.data_path, transform=transform, patch_size=mask_cell_size(args),
                               pred_ratio=args.pred_ratio, pred_ratio_var=args.pred_ratio_var,
                               pred_aspect_ratio=(0.3, 1 / 0.3), pred_shape=args.pred_shape,
                               pred_start_epoch=args.pred_start_epoch,
                               mask_crops=args.global_crops_number if args.sample_seeding else None,
                               seed=args.seed if args.sample_seeding else None,
                               skip_bad_images=args.skip_bad_images)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None


def build_data_loader(dataset, args, ctx):
    """Sampler (``DistributedSampler`` with its official seed 0, also for one process: same order for the
    same epoch; a :class:`~ibot.train.faults.ResumableSampler` so that a mid-epoch resume can skip
    batches) and loader. The loader has its own generator (reseeded per epoch): its per-epoch worker base
    seed is then not drawn from the global torch RNG, which stays reserved for the training step
    (drop-path) and so is exactly restorable on resume; crops and masks are seeded per sample anyway.
    ``--sample_seeding false`` drops that generator too (the official loader: worker seeds from the
    global torch RNG).
    """
    sampler = ResumableSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda",
                                         drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed)
                                         if args.sample_seeding else None)
    if len(loader) == 0:
        raise ConfigError(f"--data_path {args.data_path} holds {len(dataset)} images, fewer than one batch "
                          f"({args.batch_size_per_gpu} per process × {ctx.world_size} processes); "
                          "lower --batch_size_per_gpu")
    return sampler, loader


def build_networks(args):
    """Student and teacher ``MultiCropWrapper``s (official construction, section 1.3 of the spec), built
    through the architecture registry; ``--grad_checkpointing`` switches activation checkpointing on in
    the student backbone."""
    if not models.is_model(args.arch):
        raise ConfigError(f"unknown --arch {args.arch!r}; registered: {', '.join(models.arch_choices())}")
    factory = partial(models.create_model, models.resolve_name(args.arch))
    if models.model_family(args.arch) == "swin":
        # Built for 224 px as the official code does, whatever --global_crops_size: Swin's window sizes
        # (and so its relative-position tables) follow the nominal resolution, and smaller crops are
        # padded to whole windows at run time; so checkpoints keep the official shapes.
        student = factory(window_size=args.window_size, return_all_tokens=True,
                          masked_im_modeling=args.use_masked_im_modeling)
        teacher = factory(window_size=args.window_size, drop_path_rate=0.0, return_all_tokens=True)
        embed_dim = student.num_features
    else:
        student = factory(patch_size=args.patch_size, drop_path_rate=args.drop_path, return_all_tokens=True,
                          masked_im_modeling=args.use_masked_im_modeling, img_size=args.global_crops_size)
        teacher = factory(patch_size=args.patch_size, return_all_tokens=True, img_size=args.global_crops_size)
        embed_dim = student.embed_dim
    if args.grad_checkpointing:
        student.set_grad_checkpointing(True)  # the teacher never records gradients
    head_kwargs = dict(patch_out_dim=args.patch_out_dim, norm=args.norm_in_head, act=args.act_in_head,
                       hidden_dim=args.head_hidden_dim, bottleneck_dim=args.head_bottleneck_dim)
    student = MultiCropWrapper(student, iBOTHead(embed_dim, args.out_dim, norm_last_layer=args.norm_last_layer,
                                                 shared_head=args.shared_head, **head_kwargs))
    teacher = MultiCropWrapper(teacher, iBOTHead(embed_dim, args.out_dim, shared_head=args.shared_head_teacher,
                                                 **head_kwargs))
    return student, teacher


def choose_train_step(args, student):
    """The step computation of ``--train_step``, except that heads with BatchNorm need every token for
    their statistics and so use the reference computation (said once)."""
    if args.train_step == "fast" and has_batchnorms(student):
        print("Note: the projection head has BatchNorm; its statistics need every token, "
              "so the reference training step is used.")
        return "reference"
    return args.train_step


def wrap_and_init_teacher(student, teacher, ctx):
    """Move to ``ctx.device``, wrap in DDP where needed, copy the student into the teacher (quirk Q1),
    freeze the teacher. Returns ``(student, teacher, teacher_without_ddp)``."""
    student, teacher = student.to(ctx.device), teacher.to(ctx.device)
    if ctx.train_step == "reference":
        for net in (student, teacher):
            if hasattr(net.backbone, "set_fused_attn"):
                net.backbone.set_fused_attn(False)
    # The official code passes broadcast_buffers=False for Swin; its only buffers are constant indices,
    # so the default (broadcast) is equivalent and avoids a deprecated argument on recent PyTorch.
    ddp_kwargs = dict(device_ids=[ctx.gpu] if ctx.device.type == "cuda" else None)
    teacher_without_ddp = teacher
    if has_batchnorms(student) and ctx.distributed:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        teacher = nn.parallel.DistributedDataParallel(teacher, **ddp_kwargs)
        teacher_without_ddp = teacher.module
    if ctx.distributed:
        student = nn.parallel.DistributedDataParallel(student, **ddp_kwargs)
    teacher_without_ddp.load_state_dict(unwrap(student).state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, teacher_without_ddp


def build_loss(args, device):
    """The ``iBOTLoss`` of the flags (patch width K when either head is shared, official rule)."""
    same_dim = args.shared_head or args.shared_head_teacher
    return iBOTLoss(args.out_dim, args.out_dim if same_dim else args.patch_out_dim,
                    args.global_crops_number, args.local_crops_number, args.warmup_teacher_temp,
                    args.teacher_temp, args.warmup_teacher_patch_temp, args.teacher_patch_temp,
                    args.warmup_teacher_temp_epochs, args.epochs, lambda1=args.lambda1, lambda2=args.lambda2,
                    mim_start_epoch=args.pred_start_epoch, center2_tokens=args.center2_tokens).to(device)


def build_optimization(student, args, ctx, niter_per_epoch):
    """Loss, optimizer, GradScaler (fp16 only, else None) and the ``(lr, wd, momentum)`` per-iteration
    schedules; the peak lr is scaled linearly with the total batch (``--lr`` is for 256 images)."""
    ibot_loss = build_loss(args, ctx.device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student), ctx.device.type)
    fp16_scaler = torch.amp.GradScaler(ctx.device.type) if ctx.precision == "fp16" else None
    total_batch = args.batch_size_per_gpu * ctx.world_size
    schedules = (
        cosine_scheduler(args.lr * total_batch / 256., args.min_lr, args.epochs, niter_per_epoch,
                         warmup_epochs=args.warmup_epochs),
        cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_epoch),
        cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_epoch),
    )
    return ibot_loss, optimizer, fp16_scaler, schedules


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def checkpoint_dict(student, teacher, optimizer, epoch, args, ctx, ibot_loss, fp16_scaler):
    """The official checkpoint: ``student`` keys prefixed ``module.``, ``teacher``, ``optimizer``,
    ``epoch`` (finished epochs), ``args`` (an ``argparse.Namespace``: the flags and the runtime values
    of ``ctx``), ``ibot_loss`` and ``fp16_scaler``."""
    student_state = student.state_dict()
    if not next(iter(student_state)).startswith("module."):
        student_state = {"module." + k: v for k, v in student_state.items()}
    save_dict = {"student": student_state, "teacher": unwrap(teacher).state_dict() if not isinstance(
                     teacher, nn.parallel.DistributedDataParallel) else teacher.state_dict(),
                 "optimizer": optimizer.state_dict(), "epoch": epoch, "args": saved_args(args, ctx),
                 "ibot_loss": ibot_loss.state_dict()}
    if fp16_scaler is not None:
        save_dict["fp16_scaler"] = fp16_scaler.state_dict()
    return save_dict


def resume_path(args):
    """The checkpoint to resume from: ``<output_dir>/checkpoint.pth`` when ``--auto_resume`` is on and it
    exists, else ``--load_from`` joined onto ``--output_dir`` (official), else None."""
    latest = os.path.join(args.output_dir, "checkpoint.pth")
    if args.auto_resume and rolling_checkpoints(latest):  # the newest intact one of the set is chosen later
        return latest
    if args.load_from:
        return os.path.join(args.output_dir, args.load_from)
    return None


def weights_are_finite(*modules):
    """True when every floating-point parameter and buffer of ``modules`` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values()
             if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class Checkpointer:
    """Saving, resuming and stopping on signals, at step boundaries.

    Every checkpoint is written atomically to ``<output_dir>/checkpoint.pth`` (and
    ``checkpointNNNN.pth`` when ``--saveckp_freq`` says so, official naming) and carries, beyond the
    official keys, ``iteration`` (batches of epoch ``epoch`` already trained: 0 at epoch ends, > 0 for
    mid-epoch checkpoints of ``--save_every_iters`` or a signal), ``iters_per_epoch`` and ``rng_state``
    (Python, NumPy, torch CPU/CUDA), so that a killed and resumed run ends with the same weights as an
    uninterrupted one. Use :meth:`loader` to wrap the epoch's data loader: after every step it polls
    the stop flag (all ranks agree every ``--print_freq`` steps) and writes the periodic checkpoints.
    """

    def __init__(self, args, ctx, step, optimizer, niter, stop):
        self.args, self.ctx, self.step, self.optimizer, self.niter, self.stop = args, ctx, step, optimizer, niter, stop
        self.path = os.path.join(args.output_dir, "checkpoint.pth")
        self.epoch = 0  # the epoch in progress, for the step-boundary hook

    def resume(self):
        """Load the resume checkpoint if there is one; returns ``(start_epoch, start_iter, rng_state)``."""
        args, step = self.args, self.step
        state = {"epoch": 0, "iteration": 0, "iters_per_epoch": None, "rng_state": None}
        path, checkpoint = resume_path(args), None
        if path == self.path:  # --auto_resume: the newest intact file of the rolling set
            path, checkpoint = self.newest_intact()
        if path:
            restart_from_checkpoint(path, run_variables=state, checkpoint=checkpoint, student=step.student,
                                    teacher=step.teacher, optimizer=self.optimizer, fp16_scaler=step.fp16_scaler,
                                    ibot_loss=step.ibot_loss)
        elif args.auto_resume:
            print(f"--auto_resume: no checkpoint.pth in {args.output_dir} yet: starting from scratch.")
        start_epoch, start_iter = int(state["epoch"]), int(state["iteration"] or 0)
        if start_iter and state["iters_per_epoch"] != self.niter:
            raise ConfigError(f"{path} was saved {start_iter} iterations into epoch {start_epoch} with "
                              f"{state['iters_per_epoch']} iterations per epoch, but these flags give {self.niter}: "
                              "resume with the same --batch_size_per_gpu, number of processes and --data_path")
        if path and os.path.isfile(path) and state["rng_state"] is None:
            print("Note: the checkpoint holds no RNG state (official format): the resumed run continues "
                  "correctly but does not repeat an uninterrupted run bit for bit.")
        return start_epoch, start_iter, state["rng_state"]

    def newest_intact(self):
        """``(path, contents)`` of the newest checkpoint of the rolling set that matches its checksum and
        loads; each damaged one skipped is named. Raises ``CorruptCheckpointError`` when none is intact:
        the folder holds progress, so the run refuses rather than start from scratch over it."""
        candidates = rolling_checkpoints(self.path)
        path, checkpoint, problems = load_newest_intact(candidates)
        for problem in problems:
            print(f"Warning: {problem}", flush=True)
        if path is None:
            raise CorruptCheckpointError(
                f"--auto_resume: none of the {len(candidates)} checkpoint(s) in {self.args.output_dir} is intact "
                f"({'; '.join(problems)}); refusing to start from scratch over a folder that holds progress. "
                "Move them away (or use another --output_dir) to start anew")
        if problems:
            print(f"--auto_resume: falling back to {path}, the newest intact checkpoint (epoch "
                  f"{checkpoint.get('epoch')}, iteration {checkpoint.get('iteration', 0)}).", flush=True)
        return path, checkpoint

    def save(self, epoch, iteration, reason):
        """Write checkpoint.pth for ``epoch`` finished epochs + ``iteration`` batches (``reason``:
        ``epoch``, ``periodic`` or ``signal``); returns whether it was written. Non-finite weights are
        never saved: a periodic save is skipped with a warning, the others stop the run."""
        args, step = self.args, self.step
        global_step = self.niter * epoch + iteration - 1
        if self.ctx.is_main and not weights_are_finite(step.student, step.teacher, step.ibot_loss):
            msg = (f"the weights are not finite after global step {global_step} (epoch {epoch}, iteration "
                   f"{iteration}): {reason} checkpoint not written; {self.path} from before is intact")
            if reason == "periodic":
                print(f"Warning: {msg}.", flush=True)
                return False
            raise NonFiniteLossError(msg)
        save_dict = checkpoint_dict(step.student, step.teacher, self.optimizer, epoch, args, self.ctx,
                                    step.ibot_loss, step.fp16_scaler)
        save_dict.update(iteration=iteration, iters_per_epoch=self.niter, rng_state=capture_rng_state())
        if self.ctx.is_main:
            save_checkpoint(save_dict, self.path, keep=args.keep_checkpoints)
            if reason == "epoch" and args.saveckp_freq and (epoch - 1) % args.saveckp_freq == 0 and epoch - 1:
                save_checkpoint(save_dict, os.path.join(args.output_dir, f"checkpoint{epoch - 1:04}.pth"))
        return True

    def stop_requested(self, poll_collective=True):
        """True when SIGTERM/SIGINT arrived; in a distributed run every rank must agree, so the flag is
        all-reduced (only when ``poll_collective``, i.e. at steps all ranks reach together)."""
        flag = self.stop.requested
        if self.ctx.distributed:
            if not poll_collective:
                return False
            t = torch.tensor([1.0 if flag else 0.0], device=self.ctx.device)
            flag = dist_utils.all_reduce_sum(t).item() > 0
        return flag

    def interrupt(self, epoch, iteration):
        """Raise :class:`TrainingInterrupted` after the signal's checkpoint is written."""
        name = self.stop.signal_name or "SIGTERM"
        where = (f"after iteration {iteration} of {self.niter} of epoch {epoch}" if iteration
                 else f"after {epoch} finished epoch(s)")
        raise TrainingInterrupted(
            f"stopped on {name} {where}; checkpoint saved to {self.path}. "
            f"Continue with the same flags plus --auto_resume true (or --load_from checkpoint.pth).", name)

    def on_step_end(self, done):
        """Hook after ``done`` batches of the current epoch: stop on a signal, or a periodic save."""
        if done >= self.niter:  # end of the epoch: saved by the epoch loop
            return
        if self.stop_requested(poll_collective=done % self.args.print_freq == 0):
            self.save(self.epoch, done, "signal")
            self.interrupt(self.epoch, done)
        if self.args.save_every_iters and done % self.args.save_every_iters == 0:
            self.save(self.epoch, done, "periodic")

    def loader(self, data_loader):
        """``data_loader`` wrapped so that :meth:`on_step_end` runs after every step."""
        return StepBoundaryLoader(data_loader, self.niter, self.on_step_end)


def _clean_data_error(err):
    """A ``BadImageError`` re-raised by a DataLoader worker carries the worker's traceback in its
    message; keep the original message (its last line) and add the remedy."""
    text = str(err).strip()
    if "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("BadImageError") else last
    return BadImageError(f"{text} (pass --skip_bad_images true to skip unreadable files)")


def write_resolved_flags(args, ctx):
    """``<output_dir>/args.json``: every flag of the run after the config file and the command line
    (rank 0 only); a recipe file of the run, loadable with ``--config``."""
    if ctx.is_main:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "config"}, f, indent=1, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def train_ibot(args):
    """Run iBOT pre-training with the parsed flags ``args``; returns the last epoch's stats.

    Raises ``ConfigError`` (bad flags/paths/data, before training), ``NonFiniteLossError`` (divergence;
    the last checkpoint is left intact), ``BadImageError`` (unreadable file, naming it),
    ``CheckpointWriteError`` (saving failed; the previous checkpoint is intact) and
    ``TrainingInterrupted`` after SIGTERM/SIGINT, once a checkpoint has been written. ``args`` is
    not modified.
    """
    args = complete_args(args)
    errors = check_args(args)
    if errors:
        raise ConfigError("\n".join(errors))

    # ============ the process ... ============
    info = dist_utils.init_distributed(args.dist_url, timeout_s=args.dist_timeout)
    fix_random_seeds(args.seed)
    print_run_header(args)
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.output_dir, exist_ok=True)
    run_lock = RunLock(args.output_dir) if info.rank == 0 else None  # before anything in the folder changes
    if run_lock is not None:
        try:
            run_lock.acquire()
        except RunLockError as err:
            raise ConfigError(str(err)) from None
        for path in remove_stale_temp_files(args.output_dir):
            print(f"Removed {path} (left by a run killed while saving a checkpoint).")

    # ============ data ... ============
    dataset = build_dataset(args)
    ctx = make_context(args, info, has_labels=dataset.has_labels)
    sampler, data_loader = build_data_loader(dataset, args, ctx)
    niter = len(data_loader)
    print(f"Data loaded: there are {len(dataset)} images.")

    # ============ networks and the training step ... ============
    student, teacher = build_networks(args)
    ctx = ctx.replace(train_step=choose_train_step(args, student))
    student, teacher, teacher_without_ddp = wrap_and_init_teacher(student, teacher, ctx)
    print(f"Student and Teacher are built: they are both {args.arch} network.")
    ibot_loss, optimizer, fp16_scaler, schedules = build_optimization(student, args, ctx, niter)
    step = iBOTTrainStep.from_args(student, teacher, teacher_without_ddp, ibot_loss, args, ctx, fp16_scaler)
    write_resolved_flags(args, ctx)
    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=os.path.join(args.output_dir, "tf_logs"))
    print("Loss, optimizer and schedulers ready.")

    # ============ resume ... ============
    stop = StopOnSignal()
    checkpointer = Checkpointer(args, ctx, step, optimizer, niter, stop)
    start_epoch, start_iter, rng_state = checkpointer.resume()
    loader = checkpointer.loader(data_loader)
    periodic_knn = PeriodicKNN(args, ctx.device) if args.eval_every > 0 else None

    start_time = time.time()
    print("Starting iBOT training!")
    if start_iter:
        print(f"Resuming inside epoch {start_epoch}: skipping its first {start_iter} of {niter} iterations.")
    if rng_state is not None:
        restore_rng_state(rng_state)
    train_stats = {}
    try:
        with stop:
            for epoch in range(start_epoch, args.epochs):
                checkpointer.epoch = epoch
                sampler.set_epoch(epoch)
                dataset.set_epoch(epoch)
                if data_loader.generator is not None:
                    data_loader.generator.manual_seed(args.seed * 1000003 + epoch)
                if epoch == start_epoch and start_iter:
                    loader.skip(start_iter)
                try:
                    train_stats = run_epoch(step, loader, optimizer, schedules, epoch, epochs=args.epochs,
                                            print_freq=args.print_freq, has_labels=ctx.has_labels)
                except BadImageError as err:
                    raise _clean_data_error(err) from None

                if args.skip_bad_images:  # summed over the DataLoader workers and the ranks
                    skipped = torch.tensor([float(dataset.skipped_this_epoch())], device=ctx.device)
                    train_stats["bad_images_skipped"] = int(dist_utils.all_reduce_sum(skipped).item())
                    print(f"Epoch {epoch}: skipped {train_stats['bad_images_skipped']} unreadable image(s) "
                          "(all processes and workers; each is named in a warning)", flush=True)
                checkpointer.save(epoch + 1, 0, "epoch")
                knn_stats = {}
                if periodic_knn is not None and should_evaluate(epoch, args):  # every rank takes part
                    knn_stats = periodic_knn({"teacher": teacher_without_ddp.backbone,
                                              "student": unwrap(student).backbone})
                    print(f"Epoch {epoch} k-NN: {knn_stats}", flush=True)
                if ctx.is_main:
                    resources = process_resources()  # the record that shows growth over a long run
                    log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **knn_stats, "epoch": epoch,
                                 **resources}
                    with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                        f.write(json.dumps(log_stats) + "\n")
                    for k, v in {**train_stats, **knn_stats, **resources}.items():
                        writer.add_scalar(k, v, epoch)
                    writer.flush()
                    if dataset.num_bad_images:
                        print(f"Skipped {dataset.num_bad_images} unreadable image(s) so far (this process): "
                              f"{sorted(dataset.bad_images)}")
                if checkpointer.stop_requested():
                    checkpointer.interrupt(epoch + 1, 0)
    except RuntimeError as err:  # a stalled rank (--dist_timeout) or a killed loader worker: say which
        known = (as_collective_timeout(err, args.dist_timeout, f"in epoch {checkpointer.epoch}")
                 or as_worker_killed(err, args.num_workers))
        if known is None:
            raise
        raise known from None
    finally:
        if writer is not None:
            writer.close()
        if run_lock is not None:
            run_lock.release()
    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    return train_stats
