"""Faults at cluster scale (issue 18): damaged checkpoints and the rolling set, one run per folder,
full disks, stalled ranks, killed loader workers."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_ibot
from ibot.train.run_lock import RunLock, RunLockError
from ibot.utils.checkpoint import (CheckpointWriteError, DamagedCheckpointError, checksum_path,
                                   previous_checkpoint_path, rolling_checkpoints, safe_load, save_checkpoint)

from main_process import child_env as _env, spawn_main, wait_for

REPO = Path(__file__).resolve().parents[1]


def _wait_for(log, pattern, proc, timeout=180):
    return wait_for(log, pattern, proc, timeout)


def _flags(data, out, *extra, epochs=2, batch=16):
    return ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
            "--out_dim", "64", "--patch_out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
            "--data_path", str(data), "--output_dir", str(out), "--num_workers", "0",
            "--batch_size_per_gpu", str(batch), "--drop_path", "0.1", "--epochs", str(epochs),
            "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1", "--print_freq", "1", *map(str, extra)]


def _main(argv):
    try:
        main_ibot.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def _teacher_diff(a, b):
    return max((a["teacher"][k].double() - b["teacher"][k].double()).abs().max().item() for k in a["teacher"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """small: 16 Fashion-MNIST images (one batch of 16, one iteration per epoch); train: 40 (two)."""
    from ibot.data.fmnist import build_fmnist_folder
    root = tmp_path_factory.mktemp("fmnist_cluster")
    build_fmnist_folder(str(root), size=32, per_class_train=4, per_class_val=1)
    small = root / "small"
    small.mkdir()
    for k, d in enumerate(sorted((root / "train").iterdir())):
        (small / d.name).mkdir()
        for p in sorted(d.iterdir())[: 2 if k < 6 else 1]:  # 6·2 + 4·1 = 16 images = one batch
            shutil.copy(p, small / d.name / p.name)
    return {"small": small, "train": root / "train"}


# ------------------------------------------------------------------------------------------------
# damaged checkpoints
# ------------------------------------------------------------------------------------------------
def _damage(path, kind):
    data = bytearray(Path(path).read_bytes())
    if kind == "zero-length":
        data = b""
    elif kind == "truncated":
        data = data[: len(data) // 3]
    else:  # one flipped bit in the middle (inside a tensor's bytes: torch.load alone would not notice)
        data[len(data) // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("kind,needle", [("zero-length", "zero-length file"), ("truncated", "truncated"),
                                         ("bit-flip", "does not match its SHA-256")])
def test_checksum_names_each_damage_kind(tmp_path, kind, needle):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"w": torch.arange(10000, dtype=torch.float32)}, path)
    record = json.loads(Path(checksum_path(path)).read_text())
    assert record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64 and "previous" not in record
    _damage(path, kind)
    with pytest.raises(DamagedCheckpointError, match=needle) as info:
        safe_load(path)
    assert str(path) in str(info.value)


def test_rolling_set_keeps_n_newest_and_official_files_load(tmp_path):
    path = tmp_path / "checkpoint.pth"
    for i in range(5):
        save_checkpoint({"i": torch.tensor(i)}, path, keep=3)
    assert [int(safe_load(p)["i"]) for p in rolling_checkpoints(path)] == [4, 3, 2]
    assert not os.path.exists(previous_checkpoint_path(path, 3))
    save_checkpoint({"i": torch.tensor(5)}, path, keep=2)  # lowering the flag trims the set
    assert [int(safe_load(p)["i"]) for p in rolling_checkpoints(path)] == [5, 4]
    official = tmp_path / "official.pth"
    torch.save({"i": torch.tensor(7)}, official)  # no sidecar: loads as before
    assert int(safe_load(official)["i"]) == 7


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, small):
    """A 2-epoch run (keep 2): checkpoint.pth = epoch 2, checkpoint.pth.1 = epoch 1. Also a copy of
    the folder right after epoch 1."""
    out = tmp_path_factory.mktemp("two_epochs")
    assert _main(_flags(small["small"], out, "--keep_checkpoints", "2")) == 0
    return out


@pytest.mark.parametrize("kind,needle", [("zero-length", "zero-length file"), ("truncated", "truncated"),
                                         ("bit-flip", "does not match its SHA-256")])
def test_auto_resume_falls_back_to_newest_intact(tmp_path, capsys, small, two_epochs, kind, needle):
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    final = safe_load(out / "checkpoint.pth")
    epoch1 = safe_load(out / "checkpoint.pth.1")
    assert (final["epoch"], epoch1["epoch"]) == (2, 1)
    _damage(out / "checkpoint.pth", kind)
    capsys.readouterr()
    # the fallback (epoch 1) is loaded, then epoch 2 is trained again: exact resume gives the lost file
    assert _main(_flags(small["small"], out, "--auto_resume", "true", "--keep_checkpoints", "2")) == 0
    log = capsys.readouterr().out
    assert needle in log and str(out / "checkpoint.pth") in log, log[-3000:]
    assert f"falling back to {out / 'checkpoint.pth.1'}" in log and "(epoch 1, iteration 0)" in log
    redone = safe_load(out / "checkpoint.pth")
    assert redone["epoch"] == 2 and _teacher_diff(redone, final) <= 1e-6
    assert _teacher_diff(safe_load(out / "checkpoint.pth.1"), epoch1) == 0


def test_no_intact_checkpoint_refuses(tmp_path, capsys, small, two_epochs):
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    _damage(out / "checkpoint.pth", "truncated")
    _damage(out / "checkpoint.pth.1", "bit-flip")
    before = {p: p.stat().st_mtime_ns for p in out.glob("checkpoint*")}
    code = _main(_flags(small["small"], out, "--auto_resume", "true"))
    err = capsys.readouterr().err
    assert code == 2 and "none of the 2 checkpoint(s)" in err and "refusing to start from scratch" in err, err
    assert "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("checkpoint*")} == before  # nothing overwritten


def test_checkpoint_without_checksum_still_resumes(tmp_path, capsys, small, two_epochs):
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    for p in out.glob("*.sha256"):
        p.unlink()
    final = safe_load(out / "checkpoint.pth")
    assert _main(_flags(small["small"], out, "--auto_resume", "true", "--epochs", "3")) == 0
    log = capsys.readouterr().out
    assert "Found checkpoint at" in log and "Warning" not in log
    assert safe_load(out / "checkpoint.pth")["epoch"] == 3
    assert _teacher_diff(safe_load(out / "checkpoint.pth.1"), final) == 0


# ------------------------------------------------------------------------------------------------
# one run per folder
# ------------------------------------------------------------------------------------------------
_HOLDER = ("import sys, time; from ibot.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
           "print('locked', flush=True); time.sleep(600)")


def test_second_run_refuses_live_lock_then_takes_over_stale(tmp_path, capsys, small):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        record = json.loads((out / "run.lock").read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        code = _main(_flags(small["small"], out, "--epochs", "1"))
        err = capsys.readouterr().err
        assert code == 2 and "in use by a live run" in err, err
        assert f"process id {holder.pid}" in err and f"host {record['host']}" in err and record["started"] in err
        assert not (out / "checkpoint.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    code = _main(_flags(small["small"], out, "--epochs", "1"))
    log = capsys.readouterr().out
    assert code == 0 and f"taking over {out / 'run.lock'}" in log and f"process id {holder.pid}" in log
    assert (out / "checkpoint.pth").exists() and not (out / "run.lock").exists()  # released at the end


def test_lock_from_another_host_refuses(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-that-is-not-here", "pid": 1,
                                                   "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunLockError, match="host node-that-is-not-here, process id 1, started 2026-01-01"):
        RunLock(tmp_path).acquire()


# ------------------------------------------------------------------------------------------------
# full disk (a file-size limit stands in for a full disk or a quota: the same failed write)
# ------------------------------------------------------------------------------------------------
_FSIZE = """
import resource, sys, torch
from ibot.utils.checkpoint import save_checkpoint, CheckpointWriteError
path = sys.argv[1]
save_checkpoint({"w": torch.zeros(1000)}, path, keep=2)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    save_checkpoint({"w": torch.ones(100000)}, path, keep=2)
except CheckpointWriteError as err:
    print("ERROR", err)
"""


def test_save_over_file_size_limit_names_folder_and_bytes(tmp_path):
    path = tmp_path / "checkpoint.pth"
    proc = subprocess.run([sys.executable, "-c", _FSIZE, str(path)], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout
    assert msg.startswith("ERROR") and "File too large" in msg and "RLIMIT_FSIZE" in msg, msg
    assert f"folder {tmp_path} needs about 400000 bytes" in msg and "bytes free" in msg and "intact" in msg
    kept = safe_load(path)  # verified against its checksum
    assert torch.equal(kept["w"], torch.zeros(1000))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


# ------------------------------------------------------------------------------------------------
# a loader worker killed by a signal (the OOM killer's SIGKILL)
# ------------------------------------------------------------------------------------------------
def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the workers")
def test_killed_loader_worker_is_named_and_resume_is_exact(tmp_path, capsys, small):
    reference = tmp_path / "reference"
    assert _main(_flags(small["train"], reference)) == 0  # 2 epochs of 2 iterations, no workers
    out = tmp_path / "out"
    argv = _flags(small["train"], out)
    argv[argv.index("--num_workers") + 1] = "2"  # per-sample seeding: workers do not change the data
    log = tmp_path / "log1"
    proc = subprocess.Popen([sys.executable, str(REPO / "main_ibot.py"), *argv], cwd=str(REPO), env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(log, r"Epoch: \[1/2\]\s+\[0/2\]", proc)  # epoch 2 has started: its workers are alive
        workers = _children(proc.pid)
        assert workers, "no DataLoader worker found"
        os.kill(workers[0], signal.SIGKILL)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 1 and f"worker (pid {workers[0]}) was killed by signal SIGKILL" in text, text[-3000:]
    assert "--num_workers" in text and "--auto_resume true" in text and "Traceback" not in text
    assert safe_load(out / "checkpoint.pth")["epoch"] == 1
    capsys.readouterr()
    assert _main(argv + ["--auto_resume", "true"]) == 0
    final, expected = safe_load(out / "checkpoint.pth"), safe_load(reference / "checkpoint.pth")
    assert final["epoch"] == 2 and _teacher_diff(final, expected) <= 1e-6


# ------------------------------------------------------------------------------------------------
# bad images: named, or skipped and counted over workers and ranks
# ------------------------------------------------------------------------------------------------
def _png_bomb(path, side=20000):
    """A valid PNG header declaring side × side pixels (grayscale) with a token data chunk: PIL's
    decompression-bomb check reads only the header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""))


def _add_bad_images(root):
    """One bad file of each kind, each in a different class folder (never next to another in order)."""
    from PIL import Image
    classes = sorted(d for d in Path(root).iterdir() if d.is_dir())
    good = next(classes[0].iterdir())
    Image.open(good).convert("RGB").save(classes[0] / "bad_truncated.jpg", quality=95)
    data = (classes[0] / "bad_truncated.jpg").read_bytes()
    (classes[0] / "bad_truncated.jpg").write_bytes(data[: len(data) // 2])
    (classes[1] / "bad_empty.png").write_bytes(b"")
    (classes[2] / "bad_text.jpg").write_text("this is not an image\n")
    _png_bomb(classes[3] / "bad_bomb.png")
    return {"truncated": classes[0] / "bad_truncated.jpg", "zero-byte": classes[1] / "bad_empty.png",
            "not-an-image": classes[2] / "bad_text.jpg", "bomb": classes[3] / "bad_bomb.png"}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, small):
    """24 files: the 16 small images, 4 more good ones and one bad file of each kind."""
    root = tmp_path_factory.mktemp("bad_images") / "data"
    shutil.copytree(small["small"], root)
    extra = [p for d in sorted(small["train"].iterdir()) for p in sorted(d.iterdir())
             if not (root / d.name / p.name).exists()][:4]
    for p in extra:
        shutil.copy(p, root / p.parent.name / p.name)
    return root, _add_bad_images(root)


def test_each_bad_image_kind_is_named(bad_folder):
    from ibot.data.folders import BadImageError, ImageFolderMask
    root, bad = bad_folder
    ds = ImageFolderMask(root, patch_size=8, pred_ratio=0.3, pred_ratio_var=0.0)
    index = {p: i for i, (p, _) in enumerate(ds.samples)}
    reasons = {"truncated": "truncated", "zero-byte": "cannot identify", "not-an-image": "cannot identify",
               "bomb": "decompression bomb"}
    for kind, path in bad.items():
        with pytest.raises(BadImageError) as info:
            ds[index[str(path)]]
        assert str(path) in str(info.value) and reasons[kind] in str(info.value).lower(), (kind, info.value)


def _launch_two_ranks(argv, tmp_path):
    """Two gloo processes of main_ibot.py started as a launcher would (RANK, WORLD_SIZE, MASTER_*)."""
    procs, logs, port = [], [], _free_port()
    for rank in range(2):
        logs.append(tmp_path / f"rank{rank}.log")
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "main_ibot.py"), *argv], cwd=str(REPO), env=env,
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    return procs, logs


@pytest.mark.slow
def test_two_ranks_count_bad_images_once_then_a_stopped_rank_fails_the_other(tmp_path, bad_folder):
    """One 2-process launch (to keep CI short) for two cases: (1) with --skip_bad_images every bad file
    is skipped and the epoch's count, summed over 2 ranks × 2 workers, is 4 in the log line and log.txt;
    (2) then rank 1 is SIGSTOPped: rank 0 stops within --dist_timeout plus a margin, naming it."""
    root, bad = bad_folder
    timeout_s = 8
    argv = _flags(root, tmp_path / "out", "--skip_bad_images", "true", "--epochs", "50", "--warmup_epochs", "0",
                  "--dist_timeout", timeout_s, batch=12)
    argv[argv.index("--num_workers") + 1] = "2"
    procs, logs = _launch_two_ranks(argv, tmp_path)  # 24 files = 2 ranks × one batch of 12 per epoch
    try:
        _wait_for(logs[0], r"Epoch: \[1/50\]", procs[0])
        epoch0 = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[0])
        assert epoch0["epoch"] == 0 and epoch0["train_bad_images_skipped"] == 4, epoch0
        assert "Epoch 0: skipped 4 unreadable image(s) (all processes and workers" in logs[0].read_text()
        text = "".join(log.read_text() for log in logs)
        for path in bad.values():  # each named in a warning by the worker that met it
            assert f"skipping unreadable image {path}" in text, path

        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        code = procs[0].wait(timeout=timeout_s + 60)
        waited = time.time() - stopped
        log = logs[0].read_text()
        assert code == 1 and f"waited longer than --dist_timeout {timeout_s} s" in log, log[-3000:]
        assert "Traceback" not in log
        print(f"rank 0 stopped {waited:.1f} s after SIGSTOP of rank 1")
        assert waited <= timeout_s + 30, waited
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


# ------------------------------------------------------------------------------------------------
# elastic restarts: torchrun restarts the group after a rank is SIGKILLed, and the run ends exact
# ------------------------------------------------------------------------------------------------
def _torchrun(argv, log, max_restarts):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), str(REPO / "main_ibot.py"), *argv]
    return subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _worker_with_rank(launcher_pid, rank):
    for pid in _children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


# 2 ranks × 4 images of small["train"]: 5 iterations per epoch, so a kill lands well inside the last epoch
ELASTIC_FLAGS = ["--epochs", "2", "--auto_resume", "true", "--save_every_iters", "1"]


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory, small):
    """checkpoint.pth of ``torchrun --standalone --nproc_per_node 2`` run without interruption."""
    out = tmp_path_factory.mktemp("elastic_reference")
    proc = _torchrun(_flags(small["train"], out / "run", *ELASTIC_FLAGS, batch=4), out / "run.log", 0)
    assert proc.wait(timeout=240) == 0, (out / "run.log").read_text()[-3000:]
    return safe_load(out / "run" / "checkpoint.pth")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the ranks")
def test_torchrun_restart_after_a_killed_rank_ends_like_an_uninterrupted_run(tmp_path, small, uninterrupted_two_ranks):
    argv = _flags(small["train"], tmp_path / "out", *ELASTIC_FLAGS, batch=4)
    log = tmp_path / "run.log"
    proc = _torchrun(argv, log, 1)
    try:
        _wait_for(log, r"Epoch: \[1/2\]\s+\[1/5\]", proc)  # the middle of the last epoch
        victim = _worker_with_rank(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("Starting iBOT training!") == 2, text[-4000:]  # the first attempt and the restart
    assert re.search(r"Found checkpoint at .*checkpoint\.pth", text) and "Resuming inside epoch 1" in text
    final = safe_load(tmp_path / "out" / "checkpoint.pth")
    assert final["epoch"] == 2 and _teacher_diff(final, uninterrupted_two_ranks) <= 1e-6


# ------------------------------------------------------------------------------------------------
# several nodes: two torchrun launchers (--nnodes 2, c10d rendezvous) on one machine
# ------------------------------------------------------------------------------------------------
def _launcher(argv, log, port, run_id):
    """One 'node' of a 2-node job: a torchrun launcher with one process, joined by c10d rendezvous."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
           "--max-restarts", "0", str(REPO / "main_ibot.py"), *argv]
    return subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _kill_node(proc):
    """SIGKILL a launcher and everything under it, as a node that loses power (torchrun starts its
    workers in sessions of their own, so a process-group kill would miss them)."""
    tree, queue = [], [proc.pid]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        try:
            queue += _children(pid)
        except OSError:
            pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the ranks")
def test_two_launchers_train_and_resume_like_one_launcher_with_two_processes(tmp_path, small,
                                                                             uninterrupted_two_ranks):
    """Node failure: both 'nodes' are killed in the middle of the last epoch, relaunched with
    --auto_resume, and the run ends with the teacher of one launcher running 2 processes throughout."""
    argv = _flags(small["train"], tmp_path / "out", *ELASTIC_FLAGS, batch=4)

    def launch(attempt):
        port = _free_port()
        return [_launcher(argv, tmp_path / f"node{n}_{attempt}.log", port, f"job{attempt}") for n in range(2)]

    nodes = launch(0)
    try:
        _wait_for(tmp_path / "node0_0.log", r"Epoch: \[1/2\]\s+\[1/5\]", nodes[0], timeout=240)
    finally:
        for proc in nodes:
            _kill_node(proc)
    first = (tmp_path / "node0_0.log").read_text() + (tmp_path / "node1_0.log").read_text()
    assert "| distributed init (rank 0" in first and "| distributed init (rank 1" in first, first[-3000:]

    nodes = launch(1)
    try:
        for n, proc in enumerate(nodes):
            assert proc.wait(timeout=300) == 0, (tmp_path / f"node{n}_1.log").read_text()[-4000:]
    finally:
        for proc in nodes:
            if proc.poll() is None:
                _kill_node(proc)
    second = (tmp_path / "node0_1.log").read_text() + (tmp_path / "node1_1.log").read_text()
    assert "Resuming inside epoch 1" in second, second[-4000:]
    final = safe_load(tmp_path / "out" / "checkpoint.pth")
    assert final["epoch"] == 2 and _teacher_diff(final, uninterrupted_two_ranks) <= 1e-6


# ------------------------------------------------------------------------------------------------
# load: memory and open files stay flat over a run
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc for current RSS and open files")
def test_memory_and_open_files_stay_flat_over_ten_epochs(tmp_path, small):
    """Every epoch re-creates the loader workers, saves a rolling checkpoint and an epoch checkpoint and
    writes TensorBoard scalars; every second one runs a k-NN evaluation (epochs 2 and 10 included).
    log.txt records the process's RSS and open file descriptors after each epoch; after epoch 2 and
    after epoch 10 they differ by less than 5 %."""
    root = small["train"].parent
    argv = _flags(small["small"], tmp_path / "out", "--epochs", "10", "--eval_every", "2", "--eval_data_path", root,
                  "--eval_resize_size", "32", "--eval_crop_size", "32", "--eval_num_workers", "1",
                  "--saveckp_freq", "1", batch=16)
    argv[argv.index("--num_workers") + 1] = "2"
    log = tmp_path / "run.log"
    proc = spawn_main(argv, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(10))
    assert [e for e, r in enumerate(rows) if "knn_top1_teacher" in r] == [1, 3, 5, 7, 9]
    rss, fds = [r["proc_rss_mib"] for r in rows], [r["proc_open_fds"] for r in rows]
    print("RSS MiB by epoch:", rss, "\nopen fds by epoch:", fds)
    assert abs(rss[9] - rss[1]) / rss[1] < 0.05, rss
    assert abs(fds[9] - fds[1]) / fds[1] < 0.05, fds
    assert len(list((tmp_path / "out").glob("checkpoint000*.pth"))) == 9  # epoch checkpoints 1..9 were written
