"""The run context of pre-training: what a run learns about itself at start-up.

``args`` holds the validated flags and is never written after validation; the values that depend on
the machine, the launcher or the data — device, rank, world size, precision, the training step in
use, whether the data set has labels — live in a :class:`RunContext` that the driver builds once and
passes on. Checkpoints still record them in their ``args`` Namespace (official format).
"""
import argparse
import dataclasses
from typing import Optional

import torch

from ibot.utils.distributed import DistributedInfo

__all__ = ["RunContext", "resolve_precision", "make_context", "info_from_args", "saved_args"]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Runtime facts of one process of a run.

    ``precision``: ``fp32`` | ``fp16`` (autocast + GradScaler) | ``bf16``; ``train_step``: the step
    computation in use (``fast`` or ``reference``; BatchNorm heads force the reference one);
    ``has_labels``: the data folder has class sub-folders (clustering monitors are computed).
    """
    device: torch.device
    rank: int = 0
    world_size: int = 1
    gpu: int = -1
    distributed: bool = False
    precision: str = "fp32"
    train_step: str = "fast"
    has_labels: bool = True

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    def replace(self, **changes) -> "RunContext":
        """A copy with ``changes`` applied (the context itself is immutable)."""
        return dataclasses.replace(self, **changes)


def resolve_precision(args, device) -> str:
    """``--precision`` if given; else fp16 when ``--use_fp16`` on a GPU, fp32 otherwise (with a note
    when ``--use_fp16`` is ignored on a CPU)."""
    if args.precision is not None:
        return args.precision
    if args.use_fp16 and device.type != "cuda":
        print("Note: --use_fp16 applies to GPUs; running in fp32 on the CPU (use --precision bf16 for "
              "bfloat16 autocast).")
    return "fp16" if (args.use_fp16 and device.type == "cuda") else "fp32"


def make_context(args, info: Optional[DistributedInfo] = None, **overrides) -> RunContext:
    """The context of ``args`` on the process described by ``info`` (one CPU/GPU process if None)."""
    if info is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        info = DistributedInfo(0, 1, 0 if device.type == "cuda" else -1, False, device)
    ctx = RunContext(device=info.device, rank=info.rank, world_size=info.world_size, gpu=info.gpu,
                     distributed=info.distributed, precision=resolve_precision(args, info.device),
                     train_step=args.train_step)
    return ctx.replace(**overrides) if overrides else ctx


def info_from_args(args) -> Optional[DistributedInfo]:
    """The :class:`DistributedInfo` the official ``init_distributed_mode(args)`` wrote into ``args``
    (``rank``, ``world_size``, ``gpu``, ``distributed``, ``device``), or None when it did not run."""
    fields = ("rank", "world_size", "gpu", "distributed", "device")
    if not all(hasattr(args, f) for f in fields):
        return None
    return DistributedInfo(*(getattr(args, f) for f in fields))


def saved_args(args, ctx: RunContext) -> argparse.Namespace:
    """The ``args`` a checkpoint records: the flags plus the runtime values the official code wrote
    into its args (``rank``, ``world_size``, ``gpu``, ``distributed``) and the resolved precision and
    step; no device object (checkpoints load with ``weights_only=True``)."""
    runtime = dict(rank=ctx.rank, world_size=ctx.world_size, gpu=ctx.gpu, distributed=ctx.distributed,
                   precision=ctx.precision, train_step=ctx.train_step, has_labels=ctx.has_labels)
    return argparse.Namespace(**{**vars(args), **runtime})
