"""Process-group set-up and the few collective helpers the trainer needs.

Launch modes (``init_distributed_mode``):
- ``torchrun --nproc_per_node N main_ibot.py ...`` (or any launcher setting ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``): NCCL on GPUs, gloo on CPU; multi-node with ``--nnodes``/``--node_rank``.
- SLURM (``srun``, ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``): same, with ``MASTER_ADDR``/
  ``MASTER_PORT`` taken from the environment (the official code never set the world size here).
- plain ``python main_ibot.py``: one process, no process group (every helper below works without
  one); the GPU if there is one, else the CPU.
"""
import builtins
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized():
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def unwrap(model):
    """The module inside every wrapper layer: DDP / DataParallel / EMA-style ``.module`` and
    ``torch.compile``'s ``._orig_mod``, peeled in any order and depth; a bare model is returned as is."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def get_world_size():
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def save_on_master(*args, **kwargs):
    """``torch.save`` on rank 0 only."""
    if is_main_process():
        torch.save(*args, **kwargs)


def setup_for_distributed(is_master):
    """Silence ``print`` on non-master ranks (``print(..., force=True)`` still prints)."""
    builtin_print = builtins.print

    def print(*args, **kwargs):  # noqa: A001 - deliberately shadows the builtin, as the official code does
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


def _env_int(name, default=None):
    value = os.environ.get(name)
    return default if value is None else int(value)


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process runs: ``rank`` / ``world_size`` of the job, ``gpu`` (local CUDA index, -1 on
    CPU), ``distributed`` (a process group is initialised) and the ``device`` to compute on."""
    rank: int
    world_size: int
    gpu: int
    distributed: bool
    device: torch.device


def init_distributed(dist_url="env://", timeout_s=1800):
    """Set up the process (and a process group when a launcher asked for several processes or set
    ``RANK``) and return its :class:`DistributedInfo`; writes nothing into any ``args``. ``timeout_s``:
    how long a collective may wait for the other ranks before it fails (seconds)."""
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK", 0)
    elif "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", 1) > 1:
        rank, world_size = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local_rank = _env_int("SLURM_LOCALID", rank % max(torch.cuda.device_count(), 1))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ["LOCAL_RANK"] = str(local_rank)
    else:
        rank, world_size, local_rank = 0, 1, 0

    gpu = local_rank if use_cuda else -1
    if use_cuda:
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
    distributed = world_size > 1 or "RANK" in os.environ
    info = DistributedInfo(rank, world_size, gpu, distributed, device)
    if not distributed:
        print("Will run the code on one " + ("GPU." if use_cuda else "CPU process."))
        setup_for_distributed(True)
        return info

    backend = "nccl" if use_cuda else "gloo"
    kwargs = dict(backend=backend, init_method=dist_url or "env://", world_size=world_size, rank=rank,
                  timeout=datetime.timedelta(seconds=timeout_s))
    if use_cuda:
        kwargs["device_id"] = device
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and kwargs["init_method"] == "env://":
        # torchrun keeps its store across restarts of the group: without a prefix per attempt, the
        # restarted ranks would read the gloo/NCCL addresses of the killed attempt and fail to connect
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                             is_master=not agent_store and rank == 0, timeout=kwargs["timeout"])
        kwargs.pop("init_method")
        kwargs["store"] = dist.PrefixStore(f"ibot/attempt_{attempt}/", base)
    dist.init_process_group(**kwargs)
    print(f"| distributed init (rank {rank}, {backend}): {kwargs.get('init_method', 'env:// (torchrun attempt ' + str(attempt) + ')')}", flush=True)
    dist.barrier()
    setup_for_distributed(rank == 0)
    return info


def init_distributed_mode(args):
    """Official behaviour for ``utils`` users: :func:`init_distributed`, then set ``args.rank``,
    ``args.world_size``, ``args.gpu`` (local CUDA index, or -1 on CPU), ``args.distributed`` and
    ``args.device``. The pre-training driver keeps these in its run context instead."""
    info = init_distributed(getattr(args, "dist_url", "env://"))
    args.rank, args.world_size, args.gpu = info.rank, info.world_size, info.gpu
    args.distributed, args.device = info.distributed, info.device
    return info


def init_distributed_once(args):
    """``init_distributed_mode(args)`` unless it already ran for these ``args`` (scripts that evaluate
    several checkpoint keys call their main once per key)."""
    if not getattr(args, "_dist_ready", False):
        init_distributed_mode(args)
        args._dist_ready = True


def shutdown_distributed():
    """Wait for every rank, then destroy the process group (no-op without one). Entry points call it on
    a normal exit: a rank that leaves while gloo/NCCL threads of a live group still run can abort
    with ``terminate called without an active exception``."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """In-place SUM all-reduce (no-op without a process group); returns the tensor."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def concat_all_gather(tensor):
    """Gather ``tensor`` (same shape on every rank) from all ranks and concatenate along dim 0."""
    if not is_dist_avail_and_initialized():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)
