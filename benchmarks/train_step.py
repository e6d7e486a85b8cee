#!/usr/bin/env python
"""Throughput and peak memory of one iBOT training step (``ibot.train.step.iBOTTrainStep``) on synthetic data.

Accepts every ``main_ibot.py`` flag (``ibot.cli.get_args_parser`` is the parent parser) plus:

- ``--steps N`` timed steps (default 5) after ``--warmup_steps W`` (default 2); the median is reported;
- ``--mode fast|reference|both``: the fast step (``--train_step fast``) or the official computation
  (``--train_step reference``: heads on every token, explicit attention, host syncs, Python EMA);
  ``both`` runs each mode in its own child process (peak RSS is per process) and prints the ratio;
- ``--threads T`` (``torch.set_num_threads``), ``--compile true`` (``torch.compile`` the two backbones,
  experimental), ``--single_student_pass true``, ``--profile`` (``torch.profiler`` table of one step on stderr), ``--no_flops``.

The networks, loss, optimizer, precision and schedules are built with the functions of
``ibot/pretrain.py``; the images are random tensors of the crop sizes and the masks are drawn, per
image and per global crop, by ``ibot.masking.MaskGenerator`` with the ``--pred_ratio``/
``--pred_ratio_var``/``--pred_shape`` flags (one ratio draw per crop, as ``ImageFolderMask``).

Prints ONE JSON line: ``images_per_s``, ``s_per_step`` (median), ``peak_mem_mb`` (CUDA max allocated,
or the process peak RSS on the CPU), ``gflops_per_step`` (``FlopCounterMode``, one extra step after
the timed ones) and on a GPU ``tflops`` and ``mfu`` against ``--peak_tflops`` (default: H100 SXM
dense bf16/fp16 989 TFLOPS, fp32 via TF32 494.5), plus the recipe (``--grad_checkpointing true``:
activation checkpointing of the student backbone, as in training). Example (calibration recipe)::

    python benchmarks/train_step.py --mode both --arch vit_tiny --patch_size 4 --global_crops_size 32 \
        --local_crops_size 16 --local_crops_number 4 --batch_size_per_gpu 32 --out_dim 4096 \
        --shared_head true --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 --threads 2
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from ibot.train import driver as pretrain
from ibot.train.flags import get_args_parser
from ibot.data.masking import MaskGenerator
from ibot.utils.misc import bool_flag
from ibot.train.context import make_context
from ibot.train.step import iBOTTrainStep, unwrap

# dense peak TFLOPS of one H100 SXM (NVIDIA data sheet, without sparsity)
H100_PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5}


def get_parser():
    parser = argparse.ArgumentParser("iBOT train-step benchmark", parents=[get_args_parser()])
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (median reported).")
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--mode", default="fast", choices=["fast", "reference", "both"],
                        help="fast step, official (reference) step, or both in separate processes.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    known = {opt for action in parser._actions for opt in action.option_strings}
    if "--compile" not in known:
        parser.add_argument("--compile", type=bool_flag, default=False,
                            help="torch.compile the two backbones (experimental; no gain measured on CPU).")
    if "--single_student_pass" not in known:
        parser.add_argument("--single_student_pass", type=bool_flag, default=False,
                            help="Fast step: one student call over global and local crops.")
    parser.add_argument("--profile", action="store_true", help="Print a torch.profiler table of one step.")
    parser.add_argument("--no_flops", action="store_true", help="Skip the FLOP count.")
    parser.add_argument("--data", default=None,
                        help="Feed the step from this image folder through the real data loader (--num_workers "
                             "workers, --data_pipeline, masks of the flags); 'photos' builds benchmarks/loader.py's "
                             "photo folder. images_per_s is then the end-to-end figure (total wall time).")
    parser.add_argument("--bench_epoch", type=int, default=0,
                        help="Epoch index used for the schedules (0: last layer frozen if --freeze_last_layer).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="Peak of the accelerator for the MFU (default: H100 dense, by precision).")
    return parser


def make_batches(args, n, seed=0):
    """``n`` synthetic batches ``(images on the device, CPU bool masks)`` of the flags' crop sizes."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cell = pretrain.mask_cell_size(args)
    gen = MaskGenerator(None, args.pred_ratio, args.pred_ratio_var, pred_shape=args.pred_shape)
    B, ng, nl = args.batch_size_per_gpu, args.global_crops_number, args.local_crops_number
    gs, ls = args.global_crops_size, args.local_crops_size
    batches = []
    for _ in range(n):
        images = [torch.randn(B, 3, gs, gs, generator=g) for _ in range(ng)]
        images += [torch.randn(B, 3, ls, ls, generator=g) for _ in range(nl)]
        grid = (gs // cell, gs // cell)
        # ImageFolderMask: per image, one ratio draw and one mask per global crop
        per_image = [[gen(rng, None, grid) for _ in range(ng)] for _ in range(B)]
        masks = [torch.from_numpy(np.stack([per_image[b][c] for b in range(B)]))
                 for c in range(ng)]
        batches.append(([im.to(args.device) for im in images], masks))
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def profile_step(step, i, device):
    """torch.profiler tables of one step: the phases (forward+loss, backward, clip, optimizer, EMA) and the ops."""
    import ibot.train.step as train_mod
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(fn, name):
        def wrapper(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return wrapper

    names = {"forward_fast": "phase:forward+loss", "forward_reference": "phase:forward+loss",
             "clip_gradients": "phase:clip", "clip_gradients_foreach": "phase:clip",
             "ema_update": "phase:ema", "ema_update_loop": "phase:ema",
             "cancel_gradients_last_layer": "phase:cancel_last_layer"}
    saved = {n: getattr(train_mod, n) for n in names}
    for n, label in names.items():
        setattr(train_mod, n, labelled(saved[n], label))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            step(i)
            sync(device)
    finally:
        for n, fn in saved.items():
            setattr(train_mod, n, fn)
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith(("phase:", "Optimizer.step"))]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"profiled step: {total:.3f} s of CPU self time", file=sys.stderr)
    for e in phases:
        print(f"  {e.key:<40s} {e.cpu_time_total / 1e6:8.3f} s", file=sys.stderr)
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=25), file=sys.stderr)


def run(args):
    args.train_step = args.mode
    epoch = args.bench_epoch
    args.epochs = max(args.epochs, epoch + 1, args.warmup_teacher_temp_epochs + args.pred_start_epoch)
    args.warmup_epochs = min(args.warmup_epochs, args.epochs)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    student, teacher = pretrain.build_networks(args)
    ctx = make_context(args, train_step=pretrain.choose_train_step(args, student))
    args.device, args.precision = ctx.device, ctx.precision  # for the record and the batches below
    student, teacher, teacher_without_ddp = pretrain.wrap_and_init_teacher(student, teacher, ctx)
    niter = args.warmup_steps + args.steps + 2
    ibot_loss, optimizer, fp16_scaler, schedules = pretrain.build_optimization(student, args, ctx, niter)
    if args.compile:
        for net in (unwrap(student), teacher_without_ddp):
            net.backbone.compile()
    train = iBOTTrainStep.from_args(student, teacher, teacher_without_ddp, ibot_loss, args, ctx, fp16_scaler)
    feed = None
    if args.data:
        from data_feed import DataFeed, photo_folder
        feed = DataFeed(args, photo_folder() if args.data == "photos" else args.data)
    else:
        batches = make_batches(args, min(niter, 4), seed=args.seed)

    def step(i):
        images, masks = feed.next_batch() if feed is not None else batches[i % len(batches)]
        return train.train_step(optimizer, images, masks, niter * epoch + i, epoch, schedules)

    times, cpu_times, compile_s = [], [], None
    for i in range(args.warmup_steps + args.steps):
        sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = step(i)[0]
        sync(args.device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i == 0 and args.compile:
            compile_s = dt
        if i >= args.warmup_steps:
            times.append(dt)
            cpu_times.append(dc)
    loss = float(losses["loss"].detach())
    mem = peak_mem_mb(args.device)
    s_per_step = statistics.median(times)

    result = dict(mode=args.mode, device=str(args.device), precision=args.precision,
                  images_per_s=round(args.batch_size_per_gpu / s_per_step, 3), s_per_step=round(s_per_step, 4),
                  s_per_step_all=[round(t, 4) for t in times],
                  cpu_s_per_step=round(statistics.median(cpu_times), 4), peak_mem_mb=round(mem, 1),
                  loss=round(loss, 5), threads=torch.get_num_threads(), compile=args.compile,
                  single_student_pass=args.single_student_pass, grad_checkpointing=args.grad_checkpointing,
                  arch=args.arch, patch_size=args.patch_size, batch_size_per_gpu=args.batch_size_per_gpu,
                  global_crops=f"{args.global_crops_number}x{args.global_crops_size}",
                  local_crops=f"{args.local_crops_number}x{args.local_crops_size}", out_dim=args.out_dim,
                  shared_head=args.shared_head, pred_ratio=args.pred_ratio, pred_ratio_var=args.pred_ratio_var,
                  optimizer=args.optimizer, clip_grad=args.clip_grad, torch=torch.__version__)
    if compile_s is not None:
        result["first_step_s"] = round(compile_s, 2)
    if feed is not None:  # end to end: total wall time, loader stalls included
        result.update(images_per_s=round(args.batch_size_per_gpu * len(times) / sum(times), 3),
                      images_per_s_median_step=round(args.batch_size_per_gpu / s_per_step, 3),
                      data=args.data_path, data_pipeline=args.data_pipeline, num_workers=args.num_workers,
                      data_wait_s_per_step=round(feed.wait_s / (args.warmup_steps + args.steps), 4))

    if args.profile:
        profile_step(step, args.warmup_steps + args.steps, args.device)

    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            step(args.warmup_steps + args.steps + 1)
        flops = counter.get_total_flops()
        result["gflops_per_step"] = round(flops / 1e9, 2)
        if args.device.type == "cuda":
            peak = args.peak_tflops or H100_PEAK_TFLOPS[args.precision]
            result["tflops"] = round(flops / s_per_step / 1e12, 2)
            result["mfu"] = round(flops / s_per_step / 1e12 / peak, 4)
            result["peak_tflops"] = peak
    return result


def run_both(argv):
    """Each mode in a child process (peak RSS is per process); returns a combined record."""
    out = {}
    for mode in ("reference", "fast"):
        cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{mode} run failed")
        sys.stderr.write(proc.stderr)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, fast = out["reference"], out["fast"]
    return dict(mode="both", speedup=round(ref["s_per_step"] / fast["s_per_step"], 3),
                mem_ratio=round(fast["peak_mem_mb"] / ref["peak_mem_mb"], 3), fast=fast, reference=ref)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_parser().parse_args(argv)
    if args.mode == "both":
        # strip any --mode from the child's arguments (argparse: the last one wins anyway)
        result = run_both(argv)
    else:
        result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
