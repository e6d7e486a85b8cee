#!/usr/bin/env python
"""The GPU figures of issues 4 and 17 in one run (about 6-8 minutes on one H100/H200; never in CI).

1. ``step``: ``benchmarks/train_step.py`` on synthetic data, fast vs reference step, for the README
   ViT-S/16 and ViT-B/16 recipes (2x224 + 10x96 crops, 64 images, K = 8192, shared head), in fp16 and
   bf16, with and without ``--grad_checkpointing``: images/s, peak CUDA memory, TFLOPS and MFU
   (FLOPs counted once per arch and step, the same in both precisions).
2. ``augment``: the device half of ``--data_pipeline device`` (colour operations + normalisation of
   one ViT-S/16 batch on the GPU): ms per batch.
3. ``loader``: ``benchmarks/loader.py``: CPU ms per image per path (one core), then DataLoader
   images/s with 4, 8 and 16 workers for the official, fast and device paths.
4. ``end_to_end``: ``benchmarks/train_step.py --data`` (the real loader feeding the fast ViT-S/16
   bf16 step) for each pipeline with 8 and 16 workers, against item 1's synthetic figure.

Items run in that order and each one only while ``--budget_s`` (default 420) is not spent; results
are written to ``--out`` (JSON, rewritten after every measurement) and printed as Markdown tables.
Usage (on the GPU machine, from the repository root)::

    python benchmarks/gpu_figures.py --out gpu_figures.json
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

import loader as loader_bench  # the sibling benchmark scripts (this script's folder is sys.path[0])
import train_step

HERE = os.path.dirname(os.path.abspath(__file__))

RECIPES = {
    "vit_small": ["--arch", "vit_small", "--patch_size", "16", "--batch_size_per_gpu", "64",
                  "--local_crops_number", "10", "--global_crops_scale", "0.25", "1",
                  "--local_crops_scale", "0.05", "0.25", "--out_dim", "8192", "--shared_head", "true",
                  "--norm_last_layer", "false", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2"],
    "vit_base": ["--arch", "vit_base", "--patch_size", "16", "--batch_size_per_gpu", "64",
                 "--local_crops_number", "10", "--out_dim", "8192", "--shared_head", "true",
                 "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2"],
}
# --smoke: the same items on a tiny recipe, on the CPU too (checks the script, measures nothing)
SMOKE_RECIPE = ["--arch", "vit_tiny", "--patch_size", "8", "--batch_size_per_gpu", "4", "--global_crops_size", "32",
                "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "256", "--head_hidden_dim", "64",
                "--head_bottleneck_dim", "32", "--shared_head", "true", "--pred_ratio", "0", "0.3",
                "--pred_ratio_var", "0", "0.2"]
PRECISION_FLAGS = {"fp16": ["--use_fp16", "true", "--precision", "fp16"],
                   "bf16": ["--use_fp16", "false", "--precision", "bf16"]}


WORKER_COUNTS = (4, 8, 16)      # DataLoader workers of item 3
E2E_WORKERS = (8, 16)           # and of item 4


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)


def _free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_step(argv):
    """One in-process train_step.py measurement (peak memory reset before it)."""
    _free_cuda()
    args = train_step.get_parser().parse_args(argv)
    try:
        return train_step.run(args)
    finally:
        _free_cuda()


def step_figures(results, budget, steps, save):
    flops = {}
    for arch in ("vit_small", "vit_base"):
        for precision in ("bf16", "fp16"):
            for mode, ckpt in (("fast", "false"), ("reference", "false"), ("fast", "true"), ("reference", "true")):
                key = f"{arch}/{precision}/{mode}/ckpt={ckpt}"
                if budget.left() < 30:
                    results["step"][key] = "skipped: time budget spent"
                    continue
                count = (arch, mode, ckpt) not in flops
                argv = RECIPES[arch] + PRECISION_FLAGS[precision] + [
                    "--mode", mode, "--grad_checkpointing", ckpt, "--steps", str(steps), "--warmup_steps", "3"]
                if not count:
                    argv.append("--no_flops")
                try:
                    r = run_step(argv)
                except torch.cuda.OutOfMemoryError as e:
                    results["step"][key] = f"out of memory: {str(e)[:200]}"
                    save()
                    continue
                if count:
                    flops[(arch, mode, ckpt)] = r.get("gflops_per_step")
                else:
                    gflops = flops[(arch, mode, ckpt)]
                    r["gflops_per_step"] = gflops
                    peak = train_step.H100_PEAK_TFLOPS[precision]
                    r["tflops"] = round(gflops / 1e3 / r["s_per_step"], 2)
                    r["mfu"] = round(gflops / 1e3 / r["s_per_step"] / peak, 4)
                    r["peak_tflops"] = peak
                results["step"][key] = r
                save()
                print(f"[step] {key}: {r['images_per_s']} img/s, {r['peak_mem_mb']:.0f} MB, "
                      f"MFU {r.get('mfu')}", flush=True)


def augment_figure(results, budget, save):
    """Device half of the device path on one ViT-S/16 batch: ms per batch (CUDA events)."""
    from ibot.data.device_augment import prepare_crops
    from ibot.data.fast_augment import DeviceMultiCrop
    if budget.left() < 20 or not torch.cuda.is_available():
        results["augment"] = "skipped: no CUDA device or no time left"
        return
    device = torch.device("cuda")
    t = DeviceMultiCrop((0.25, 1.0), (0.05, 0.25), 2, 10)
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    samples = [t(image) for _ in range(64)]
    crops, params = torch.utils.data.default_collate(samples)
    crops = [c.pin_memory() for c in crops]
    for _ in range(3):
        prepare_crops(crops, params, device)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        prepare_crops(crops, params, device)
        end.record()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        times.append((start.elapsed_time(end), host * 1e3))
    times.sort()
    results["augment"] = dict(batch=64, crops="2x224 + 10x96", gpu_ms_per_batch=round(times[5][0], 2),
                              host_ms_per_batch=round(sorted(t[1] for t in times)[5], 2))
    save()
    print(f"[augment] {results['augment']}", flush=True)


def _json_from(cmd, timeout):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return f"failed ({proc.returncode}): {proc.stderr[-500:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_figures(results, budget, folder, save):
    recipe = RECIPES["vit_small"]
    if budget.left() < 40:
        return
    cmd = [sys.executable, os.path.join(HERE, "loader.py")] + recipe + [
        "--image_folder", folder, "--paths", "official,fast,device", "--rounds", "2", "--images", "48"]
    results["loader"]["per_core"] = _json_from(cmd, timeout=max(30, int(budget.left())))
    save()
    for path in ("official", "fast", "device"):
        for workers in WORKER_COUNTS:
            key = f"{path}/{workers}"
            if budget.left() < 25:
                results["loader"][key] = "skipped: time budget spent"
                continue
            cmd = [sys.executable, os.path.join(HERE, "loader.py")] + recipe + [
                "--image_folder", folder, "--paths", path, "--rounds", "1", "--images", "1",
                "--loader_workers", str(workers), "--loader_batches", "6" if path == "official" else "12"]
            r = _json_from(cmd, timeout=max(20, int(budget.left())))
            results["loader"][key] = r["loader_images_per_s"][path][str(workers)] if isinstance(r, dict) else r
            save()
            print(f"[loader] {key}: {results['loader'][key]} img/s", flush=True)


def end_to_end_figures(results, budget, folder, save):
    for pipeline in ("device", "fast", "pil"):
        for workers in E2E_WORKERS:
            key = f"{pipeline}/{workers}"
            if budget.left() < 40:
                results["end_to_end"][key] = "skipped: time budget spent"
                continue
            argv = RECIPES["vit_small"] + PRECISION_FLAGS["bf16"] + [
                "--mode", "fast", "--steps", "12", "--warmup_steps", "3", "--no_flops", "--data", folder,
                "--data_pipeline", pipeline, "--num_workers", str(workers)]
            try:
                r = run_step(argv)
            except Exception as e:  # report and go on: the other figures are still worth having
                r = f"failed: {type(e).__name__}: {str(e)[:300]}"
            results["end_to_end"][key] = r
            save()
            print(f"[end_to_end] {key}: {r['images_per_s'] if isinstance(r, dict) else r}", flush=True)


def markdown(results):
    lines = [f"GPU: {results['device']}, torch {results['torch']}", "",
             "| arch | precision | step | grad ckpt | images/s | peak MB | TFLOPS | MFU |", "|---|---|---|---|---|---|---|---|"]
    for key, r in results["step"].items():
        arch, precision, mode, ckpt = key.split("/")
        if isinstance(r, dict):
            lines.append(f"| {arch} | {precision} | {mode} | {ckpt.split('=')[1]} | {r['images_per_s']:.1f} | "
                         f"{r['peak_mem_mb']:.0f} | {r.get('tflops', '')} | {r.get('mfu', '')} |")
        else:
            lines.append(f"| {arch} | {precision} | {mode} | {ckpt.split('=')[1]} | {r} | | | |")
    if isinstance(results.get("augment"), dict):
        lines += ["", f"device augmentation of one ViT-S/16 batch: {results['augment']}"]
    per_core = results["loader"].get("per_core")
    if isinstance(per_core, dict):
        lines += ["", "| loader path | CPU ms/image (1 core) | images/s per core | 4 workers | 8 workers | 16 workers |",
                  "|---|---|---|---|---|---|"]
        for path, v in per_core["paths"].items():
            w = [results["loader"].get(f"{path}/{n}", "") for n in WORKER_COUNTS] + ["", "", ""]
            lines.append(f"| {path} | {v['cpu_ms_per_image']} | {v['images_per_s_per_core']} | {w[0]} | {w[1]} | {w[2]} |")
    if results["end_to_end"]:
        synth = results["step"].get("vit_small/bf16/fast/ckpt=false")
        synth = synth["images_per_s"] if isinstance(synth, dict) else None
        lines += ["", f"end to end, ViT-S/16 fast step bf16 (synthetic data: {synth} images/s)", "",
                  "| pipeline | workers | images/s | vs synthetic |", "|---|---|---|---|"]
        for key, r in results["end_to_end"].items():
            pipeline, workers = key.split("/")
            if isinstance(r, dict):
                ratio = f"{r['images_per_s'] / synth:.2f}" if synth else ""
                lines.append(f"| {pipeline} | {workers} | {r['images_per_s']:.1f} | {ratio} |")
            else:
                lines.append(f"| {pipeline} | {workers} | {r} | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser("GPU figures of issues 4 and 17")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_figures.json"))
    parser.add_argument("--budget_s", type=float, default=420.0, help="Stop starting measurements after this.")
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per step measurement.")
    parser.add_argument("--only", default="step,augment,loader,end_to_end", help="Comma-separated items to run.")
    parser.add_argument("--photos", type=int, default=384, help="Images of the photo folder for items 3-4.")
    parser.add_argument("--smoke", action="store_true", help="Tiny recipe, CPU allowed: checks the script only.")
    a = parser.parse_args(argv)
    if a.smoke:
        for arch in RECIPES:
            RECIPES[arch] = SMOKE_RECIPE
        PRECISION_FLAGS["fp16"] = ["--precision", "fp16" if torch.cuda.is_available() else "bf16"]
        global WORKER_COUNTS, E2E_WORKERS
        WORKER_COUNTS, E2E_WORKERS = (0, 2), (2,)
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_figures.py needs a CUDA device (the CPU figures come from train_step.py and loader.py)")
    budget = Budget(a.budget_s)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = dict(device=device, smoke=a.smoke, torch=torch.__version__, cpus=os.cpu_count(),
                   step={}, loader={}, end_to_end={})

    def save():
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)

    only = set(a.only.split(","))
    folder = loader_bench.build_photo_folder(os.path.join("/tmp", f"ibot_photos_{a.photos}"), n=a.photos)
    if "step" in only:
        step_figures(results, budget, a.steps, save)
    if "augment" in only:
        augment_figure(results, budget, save)
    if "loader" in only:
        loader_figures(results, budget, folder, save)
    if "end_to_end" in only:
        end_to_end_figures(results, budget, folder, save)
    results["wall_s"] = round(time.perf_counter() - budget.t0, 1)
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
