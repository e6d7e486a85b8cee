"""Autocast precision: one context manager for pre-training (a precision name) and fine-tuning (a bool)."""
import contextlib

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision, device):
    """Precision name for ``precision``: a name of :data:`PRECISIONS` is returned as is; ``True``
    (fine-tuning's ``use_amp``) means fp16 on CUDA and bf16 on any other device; ``False``/None fp32."""
    if precision is None or precision is False:
        return "fp32"
    if precision is True:
        return "fp16" if _device_type(device) == "cuda" else "bf16"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS} or a bool")
    return precision


def autocast_context(device, precision):
    """``torch.autocast`` on ``device`` (a ``torch.device`` or a type string) for ``precision``
    (see :func:`resolve_precision`); a null context for fp32."""
    name = resolve_precision(precision, device)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=_DTYPES[name])


def _device_type(device):
    return device.type if isinstance(device, torch.device) else torch.device(device).type
