"""--data_pipeline device in training (issue 17): two epochs end to end on the CPU device, and an exact
resume after a SIGKILL in the middle of the second epoch."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ibot.utils.checkpoint import safe_load
from main_process import child_env as _env, spawn_main as _spawn, wait_for as _wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fm40(tmp_path_factory):
    """40 Fashion-MNIST images of 32 px in 10 class folders: 2 steps of 16 per epoch."""
    from ibot.data.fmnist import build_fmnist_folder
    root = tmp_path_factory.mktemp("fmnist_pipeline")
    build_fmnist_folder(str(root), size=32, per_class_train=4, per_class_val=1)
    return root / "train"


def _flags(data, out, pipeline, *extra):
    return ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
            "--local_crops_number", "2", "--out_dim", "64", "--patch_out_dim", "64", "--head_hidden_dim", "32",
            "--head_bottleneck_dim", "16", "--data_path", str(data), "--output_dir", str(out),
            "--num_workers", "0", "--batch_size_per_gpu", "16", "--drop_path", "0.1", "--epochs", "2",
            "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1", "--print_freq", "1",
            "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2", "--data_pipeline", pipeline,
            *map(str, extra)]


def _max_diff(a, b):
    return max((a[k][n].double() - b[k][n].double()).abs().max().item()
               for k in ("student", "teacher") for n in a[k])


@pytest.fixture(scope="module")
def device_run(fm40, tmp_path_factory):
    """Two uninterrupted epochs with --data_pipeline device (a subprocess, one thread)."""
    out = tmp_path_factory.mktemp("device_run")
    proc = _spawn(_flags(fm40, out, "device"), out / "log")
    assert proc.wait(timeout=300) == 0, (out / "log").read_text()[-3000:]
    return out


@pytest.mark.slow
def test_device_path_trains_two_epochs(device_run):
    lines = [json.loads(line) for line in (device_run / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(torch.isfinite(torch.tensor(line["train_loss"])) for line in lines)
    ck = safe_load(device_run / "checkpoint.pth")
    assert ck["epoch"] == 2 and ck["args"].data_pipeline == "device"
    assert all(torch.isfinite(t).all() for t in ck["student"].values() if t.is_floating_point())


@pytest.mark.slow
def test_device_path_resumes_exactly_after_sigkill(fm40, device_run, tmp_path):
    out = tmp_path / "out"
    argv = _flags(fm40, out, "device", "--save_every_iters", "1")
    argv[argv.index("--num_workers") + 1] = "1"  # per-sample seeding: workers do not change the data
    proc = _spawn(argv, tmp_path / "log1")
    _wait_for(tmp_path / "log1", r"Epoch: \[1/2\]\s+\[0/2\]", proc)  # the second epoch has started
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    interrupted = safe_load(out / "checkpoint.pth")
    assert (interrupted["epoch"], interrupted.get("iteration", 0)) in {(1, 0), (1, 1), (2, 0)}
    proc = _spawn(argv + ["--load_from", "checkpoint.pth"], tmp_path / "log2")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log2").read_text()[-3000:]
    final = safe_load(out / "checkpoint.pth")
    assert final["epoch"] == 2
    assert _max_diff(final, safe_load(device_run / "checkpoint.pth")) <= 1e-6
