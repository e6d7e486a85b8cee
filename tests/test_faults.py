"""Issue #5: training that survives faults and bad input, and never runs code from a file.

Tiny CPU runs (vit_tiny/8 on 32-px Fashion-MNIST, batch 16). In-process runs call ``main_ibot.main``;
the signal tests run ``main_ibot.py`` as a subprocess with ``OMP_NUM_THREADS=1``.
"""
import argparse
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import main_ibot
from ibot.utils import checkpoint as ckpt_mod
from ibot.utils.checkpoint import CheckpointWriteError, UnsafeCheckpointError, atomic_save, safe_load
from ibot.train.faults import ResumableSampler, StopOnSignal, capture_rng_state, restore_rng_state
from main_process import child_env as _env, spawn_main as _spawn, wait_for as _wait_for
from tiny_models import tiny_pretrain_flags

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_KEYS = {"student", "teacher", "optimizer", "epoch", "args", "ibot_loss"}


def _flags(data, out, *extra, epochs=4):
    return tiny_pretrain_flags(patch_out_dim=64, data_path=data, output_dir=out, batch_size_per_gpu=16,
                               drop_path=0.1, epochs=epochs, warmup_teacher_temp_epochs=1, warmup_epochs=1,
                               print_freq=1) + [str(e) for e in extra]


def _main(argv):
    """Run ``main_ibot.main`` in-process; returns the exit code (0 when it returned normally)."""
    try:
        main_ibot.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def _max_diff(a, b):
    out = {}
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        out[key] = max((a[key][n].double() - b[key][n].double()).abs().max().item() for n in a[key])
    return out


def _all_finite(ck):
    return all(torch.isfinite(t).all() for key in ("student", "teacher") for t in ck[key].values()
               if t.is_floating_point())


@pytest.fixture(scope="module")
def fm(fmnist_folder, tmp_path_factory):
    """40 training images (2 iterations per epoch) and 16 (1 iteration, every image used)."""
    root = fmnist_folder(4, 1)
    small = tmp_path_factory.mktemp("fmnist_faults") / "small"
    small.mkdir()
    for k, d in enumerate(sorted((root / "train").iterdir())):
        (small / d.name).mkdir()
        for p in sorted(d.iterdir())[: 2 if k < 6 else 1]:  # 6·2 + 4·1 = 16 images = one batch
            shutil.copy(p, small / d.name / p.name)
    return {"train": root / "train", "small": small}


# ------------------------------------------------------------------------------------------------
# unit tests
# ------------------------------------------------------------------------------------------------
def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    state = capture_rng_state()
    atomic_save({"rng_state": state}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    restore_rng_state(safe_load(tmp_path / "r.pth")["rng_state"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resumable_sampler_skips_exactly_the_done_batches():
    data = list(range(37))
    s = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True)
    s.set_epoch(3)
    full = list(s)
    s.start_index = 2 * 8
    assert list(s) == full[16:]
    s.set_epoch(3)
    assert list(s) == full


def test_stop_on_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_interrupts_at_once():
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)


def test_atomic_save_crash_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def partial_then_fail(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", partial_then_fail)
    with pytest.raises(CheckpointWriteError, match=r"No space left.*previous file at that path.*intact"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    monkeypatch.setattr(ckpt_mod.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointWriteError, match="intact"):
        atomic_save({"epoch": 3, "w": torch.zeros(3)}, path)
    monkeypatch.undo()

    def runtime_fail(obj, f, *a, **k):  # torch's zip writer reports a full disk as RuntimeError
        f.write(b"junk")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", runtime_fail)
    with pytest.raises(CheckpointWriteError, match="intact"):
        atomic_save({"epoch": 4}, path)
    monkeypatch.undo()

    loaded = safe_load(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_stale_temp_files_removed(tmp_path):
    (tmp_path / ".tmp-checkpoint.pth-abc123").write_bytes(b"partial")
    (tmp_path / "keep.txt").write_text("x")
    assert ckpt_mod.remove_stale_temp_files(tmp_path) == [str(tmp_path / ".tmp-checkpoint.pth-abc123")]
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_every_torch_load_goes_through_safe_load():
    """Outside the tests, only ibot/utils/checkpoint.py may call torch.load (with weights_only=True)."""
    offenders = []
    # the repository's own files only (not a virtual environment or data inside the checkout)
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert "main_ibot.py" in tracked
    for rel in tracked:
        if rel.startswith("tests/") or rel == "ibot/utils/checkpoint.py":
            continue
        text = (REPO / rel).read_text(errors="replace")
        if re.search(r"(?<!`)(torch\.load|pickle\.loads?)\s*\(", text):  # ``...`` = prose
            offenders.append(rel)
    assert not offenders, f"torch.load/pickle.load outside ibot.utils.checkpoint.safe_load: {offenders}"


# ------------------------------------------------------------------------------------------------
# flags and data: one message naming the flag or path, before training, no traceback
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    (["--pred_ratio", "1.2"], "--pred_ratio"),
    (["--warmup_teacher_temp_epochs", "9"], "--epochs"),
    (["--global_crops_number", "1"], "--global_crops_number"),
    (["--global_crops_size", "30"], "--global_crops_size"),
    (["--local_crops_number", "2", "--local_crops_size", "12"], "--local_crops_size"),
    (["--global_crops_scale", "0.5", "0.2"], "--global_crops_scale"),
    (["--warmup_epochs", "7"], "--warmup_epochs"),
    (["--arch", "swin_tiny"], "--patch_size"),
    (["--save_every_iters", "-1"], "--save_every_iters"),
    (["--lr", "nan"], "--lr"),
])
def test_bad_flags_exit_2_with_message(tmp_path, capsys, fm, extra, needle):
    code = _main(_flags(fm["small"], tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("case", ["missing", "empty", "too_small"])
def test_bad_data_path_exit_2_with_message(tmp_path, capsys, fm, case):
    data = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "too_small": fm["small"]}[case]
    (tmp_path / "empty").mkdir()
    extra = ["--batch_size_per_gpu", "64"] if case == "too_small" else []
    code = _main(_flags(data, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert str(data) in err
    if case == "too_small":
        assert "fewer than one batch" in err and "--batch_size_per_gpu" in err


@pytest.fixture
def bad_folder(tmp_path, fm):
    data = tmp_path / "bad"
    shutil.copytree(fm["small"], data)
    bad = sorted(data.rglob("*.png"))[5]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return data, bad


def test_corrupt_image_stops_naming_the_file(tmp_path, capsys, bad_folder):
    data, bad = bad_folder
    code = _main(_flags(data, tmp_path / "out", "--warmup_epochs", "0", epochs=1))
    err = capsys.readouterr().err
    assert code == 1 and bad.name in err and "--skip_bad_images" in err and "Traceback" not in err, err


def test_skip_bad_images_finishes_and_names_it(tmp_path, capsys, caplog, bad_folder):
    data, bad = bad_folder
    code = _main(_flags(data, tmp_path / "out", "--warmup_epochs", "0", "--skip_bad_images", "true", epochs=1))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert str(bad) in out.out and "Skipped 1 unreadable image" in out.out
    assert str(bad) in caplog.text + out.err  # the warning of the data set
    assert safe_load(tmp_path / "out" / "checkpoint.pth")["epoch"] == 1


# ------------------------------------------------------------------------------------------------
# files that would run code are refused everywhere
# ------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"student": {}, "teacher": {"backbone.cls_token": torch.zeros(1, 1, 192)}, "epoch": 3,
                "args": argparse.Namespace(arch="vit_tiny"), "payload": _Evil(marker)}, path)
    return path, marker


def test_unsafe_checkpoint_refused_by_resume(tmp_path, capsys, fm, evil_checkpoint):
    path, marker = evil_checkpoint
    code = _main(_flags(fm["small"], tmp_path / "out", "--load_from", path, epochs=1))
    err = capsys.readouterr().err
    assert code == 2 and "refusing to load" in err and str(path) in err and "Traceback" not in err, err
    assert not marker.exists()


def test_numpy_scalars_in_args_load_but_other_objects_do_not(tmp_path):
    """Scripts that keep NumPy values in the Namespace (the official harness does) write files that
    load; a NumPy array's reducer or any other callable is still refused."""
    import numpy as np
    path = tmp_path / "numpy_args.pth"
    args = argparse.Namespace(lr=np.float64(5e-4), epochs=np.int64(3), ratio=np.float32(0.3), flag=np.bool_(True))
    torch.save({"teacher": {"w": torch.ones(2)}, "args": args}, path)
    loaded = safe_load(path)["args"]
    assert loaded.lr == 5e-4 and loaded.epochs == 3 and loaded.flag and loaded.ratio.dtype == np.float32
    torch.save({"args": argparse.Namespace(table=np.arange(3))}, tmp_path / "array.pth")
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        safe_load(tmp_path / "array.pth")


def test_unsafe_checkpoint_refused_by_evaluation_and_extraction(tmp_path, evil_checkpoint):
    import models
    from ibot.eval.weights import load_pretrained_weights
    path, marker = evil_checkpoint
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_pretrained_weights(models.vit_tiny(patch_size=8), str(path), "teacher")
    proc = subprocess.run([sys.executable, str(REPO / "extract_backbone_weights.py"), str(path),
                           str(tmp_path / "bb.pth"), "--checkpoint_key", "teacher"],
                          cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr
    assert not (tmp_path / "bb.pth").exists()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# failures during training leave the last checkpoint intact
# ------------------------------------------------------------------------------------------------
def test_diverging_run_stops_with_step_and_term(tmp_path, capsys, fm):
    out = tmp_path / "out"
    code = _main(_flags(fm["small"], out, "--lr", "1e6", "--clip_grad", "0", "--save_every_iters", "1"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    m = re.search(r"non-finite loss at global step (\d+) \(epoch (\d+)\): term (cls|patch)", err)
    assert m, err
    for word in ("lr=", "teacher temperatures", "gradient norm="):
        assert word in err
    ck = safe_load(out / "checkpoint.pth")
    assert ck["epoch"] <= int(m.group(1)) and _all_finite(ck)  # written before the bad step, finite


def test_failed_save_keeps_last_checkpoint(tmp_path, capsys, fm, monkeypatch):
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    code = _main(_flags(fm["small"], out, epochs=2))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1 and "No space left" in err and "intact" in err and "Traceback" not in err, err
    ck = safe_load(out / "checkpoint.pth")
    assert ck["epoch"] == 1 and _all_finite(ck)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


# ------------------------------------------------------------------------------------------------
# exact resume after SIGKILL, checkpoint + clean exit on SIGTERM
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fm):
    """Uninterrupted 4-epoch run (8 steps) in a subprocess; returns its final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    proc = _spawn(_flags(fm["train"], out), out / "log")
    assert proc.wait(timeout=300) == 0, (out / "log").read_text()[-3000:]
    return safe_load(out / "checkpoint.pth")


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, fm, reference_run):
    out = tmp_path / "out"
    argv = _flags(fm["train"], out, "--save_every_iters", "1")
    argv[argv.index("--num_workers") + 1] = "2"  # workers do not change data (per-sample seeding)
    proc = _spawn(argv, tmp_path / "log1")
    _wait_for(tmp_path / "log1", r"Epoch: \[2/4\]\s+\[0/2\]", proc)  # epoch 3 of 4 has started
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    interrupted = safe_load(out / "checkpoint.pth")
    assert (interrupted["epoch"], interrupted["iteration"]) in {(2, 0), (2, 1), (3, 0)}
    proc = _spawn(argv + ["--load_from", "checkpoint.pth"], tmp_path / "log2")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log2").read_text()[-3000:]
    final = safe_load(out / "checkpoint.pth")
    assert final["epoch"] == 4
    diffs = _max_diff(final, reference_run)
    assert max(diffs.values()) <= 1e-6, diffs


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, fm, reference_run):
    out = tmp_path / "out"
    argv = _flags(fm["train"], out)
    proc = _spawn(argv, tmp_path / "log1")
    _wait_for(tmp_path / "log1", r"Starting iBOT training!", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log1").read_text()[-3000:]
    log = (tmp_path / "log1").read_text()
    assert "stopped on SIGTERM" in log and "Traceback" not in log
    ck = safe_load(out / "checkpoint.pth")  # weights-only loadable, official keys + resume state
    assert OFFICIAL_KEYS <= set(ck) and "fp16_scaler" not in ck
    assert isinstance(ck["args"], argparse.Namespace) and not hasattr(ck["args"], "device")
    assert next(iter(ck["student"])).startswith("module.") and not next(iter(ck["teacher"])).startswith("module.")
    assert ck["epoch"] * 2 + ck["iteration"] < 8 and {"rng_state", "iters_per_epoch"} <= set(ck)
    proc = _spawn(argv + ["--auto_resume", "true"], tmp_path / "log2")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log2").read_text()[-3000:]
    final = safe_load(out / "checkpoint.pth")
    diffs = _max_diff(final, reference_run)
    assert final["epoch"] == 4 and max(diffs.values()) <= 1e-6, diffs
