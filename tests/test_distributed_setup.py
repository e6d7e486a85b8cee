"""init_distributed_mode: plain process, torchrun and SLURM environments (process group mocked)."""
import argparse

import pytest
import torch

from ibot.utils import distributed


@pytest.fixture
def calls(monkeypatch):
    recorded = {}
    # the code under test writes RANK/WORLD_SIZE/...: give it a private copy of the environment
    monkeypatch.setattr(distributed.os, "environ", dict(distributed.os.environ))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: recorded.update(kw))
    monkeypatch.setattr(distributed.dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    return recorded


def test_plain_process_needs_no_process_group(calls):
    args = argparse.Namespace(dist_url="env://")
    distributed.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (0, 1, -1, False)
    assert args.device.type == "cpu" and not calls


def test_torchrun_environment_uses_gloo_on_cpu(calls, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = argparse.Namespace(dist_url="env://")
    distributed.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.distributed) == (3, 4, True)
    assert calls["backend"] == "gloo" and calls["world_size"] == 4 and calls["rank"] == 3


def test_slurm_sets_the_world_size(calls, monkeypatch):
    """Official quirk Q18: the SLURM branch never set world_size; here it comes from SLURM_NTASKS."""
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    args = argparse.Namespace(dist_url="env://")
    distributed.init_distributed_mode(args)
    assert (args.rank, args.world_size) == (5, 8)
    assert calls["world_size"] == 8 and calls["rank"] == 5
    assert distributed.os.environ["WORLD_SIZE"] == "8" and distributed.os.environ["LOCAL_RANK"] == "1"


def test_shutdown_destroys_the_group_after_a_barrier(tmp_path):
    """shutdown_distributed: no-op without a group; with one, barrier then destroy (entry points call it
    so that no rank exits while the group's threads still run)."""
    import torch.distributed as dist
    distributed.shutdown_distributed()  # no group: nothing happens
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        distributed.shutdown_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
