"""Two CPU processes under torchrun (gloo), batch B each == one process with batch 2B."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).resolve().parent / "ddp_worker.py")


def _run(cmd, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """Records of the fast and the reference step: one plain process, and torchrun with 2 processes."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, WORKER, str(one), "fast,reference"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(29400 + os.getpid() % 1000), WORKER, str(two), "fast,reference"], tmp_path)
    return torch.load(one, weights_only=True), torch.load(two, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_two_gloo_processes_equal_one_process(one_and_two_processes, impl):
    a, b = (records[impl] for records in one_and_two_processes)
    for key in ("loss", "cls", "patch"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(a["center"], b["center"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["center2"], b["center2"], rtol=1e-5, atol=1e-6)
    for name in a["teacher"]:
        torch.testing.assert_close(a["teacher"][name], b["teacher"][name], rtol=1e-4, atol=1e-6, msg=name)
