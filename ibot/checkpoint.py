"""Safe checkpoint I/O: loading that never runs code from a file, and atomic saving.

Official iBOT checkpoints pickle an ``argparse.Namespace`` under ``args``; it is the only non-tensor
global they need, so it is allow-listed for ``torch.load(weights_only=True)``.
"""
import argparse
import os
import pickle
import tempfile

import torch

SAFE_GLOBALS = [argparse.Namespace]


class UnsafeCheckpointError(RuntimeError):
    """Raised when a file would need arbitrary unpickling (and so could run code) to load."""


def safe_load(path, map_location="cpu"):
    """Load a ``torch.save`` file with ``weights_only=True`` (plus ``argparse.Namespace``).

    Returns whatever the file holds (usually a dict of tensors / state dicts). Raises
    ``FileNotFoundError`` naming the path when it is missing and ``UnsafeCheckpointError`` when the
    file would need to unpickle other objects: such a file is refused, never executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs objects that weights-only loading does not allow "
            f"(only tensors, containers and argparse.Namespace are accepted, so that no file can run "
            f"code). Details: {err}") from None


def atomic_save(obj, path):
    """``torch.save`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    A crash or a full disk while writing leaves any previous file at ``path`` untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"could not write checkpoint {path} ({err.strerror}); "
                                     f"the previous file at that path, if any, is intact") from err
        raise
