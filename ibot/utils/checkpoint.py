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
_TMP_PREFIX = ".tmp-"


class UnsafeCheckpointError(RuntimeError):
    """Raised when a file would need arbitrary unpickling (and so could run code) to load."""


class CorruptCheckpointError(RuntimeError):
    """Raised when a checkpoint file is truncated or not a ``torch.save`` file."""


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
    except (RuntimeError, EOFError) as err:
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: the file is truncated or not a "
                                     f"torch.save file ({type(err).__name__}: {err})") from None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at that path (if any) is untouched."""

    def __init__(self, errno_, message):
        super().__init__(message)
        self.errno = errno_


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """``torch.save`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    A crash, a signal or a full disk while writing leaves any previous file at ``path`` untouched (a
    process killed mid-write leaves only a ``.tmp-<name>-*`` file, removed by
    :func:`remove_stale_temp_files`). Errors are raised as :class:`CheckpointWriteError` (an
    ``OSError``) saying so; ``KeyboardInterrupt``/``SystemExit`` are re-raised unchanged after cleanup.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + "-", dir=folder)
    except OSError as err:
        raise CheckpointWriteError(err.errno, f"could not write checkpoint {path} ({err.strerror}); "
                                              f"the previous file at that path, if any, is intact") from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(err, Exception):
            raise
        errno_ = getattr(err, "errno", None)
        reason = getattr(err, "strerror", None) or f"{type(err).__name__}: {err}"
        raise CheckpointWriteError(errno_, f"could not write checkpoint {path} ({reason}); "
                                           f"the previous file at that path, if any, is intact") from err
    _fsync_dir(folder)


def remove_stale_temp_files(folder):
    """Delete ``.tmp-*`` files left in ``folder`` by :func:`atomic_save` calls killed mid-write.

    Returns the removed paths.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(_TMP_PREFIX) and ".pth-" in name:
            full = os.path.join(folder, name)
            try:
                os.remove(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def _match_prefix(state_dict, model):
    """Add or strip a leading ``module.`` so that ``state_dict`` keys match ``model`` (DDP or not)."""
    model_keys = list(model.state_dict().keys())
    if not model_keys or not state_dict:
        return state_dict
    model_ddp = model_keys[0].startswith("module.")
    ckpt_ddp = next(iter(state_dict)).startswith("module.")
    if ckpt_ddp and not model_ddp:
        return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if model_ddp and not ckpt_ddp:
        return {"module." + k: v for k, v in state_dict.items()}
    return state_dict


def restart_from_checkpoint(ckp_path, run_variables=None, **kwargs):
    """Official resume helper, with safe loading: load ``ckpt[name]`` into each object passed by name.

    Modules are loaded with ``strict=False`` (official), after matching the ``module.`` prefix; the
    result (missing/unexpected keys) is printed. Objects without ``strict`` (optimizer, GradScaler) are
    loaded plainly. Entries of ``run_variables`` found in the file are copied into it. A missing file
    is ignored, as in the official code, but said.
    """
    if not os.path.isfile(ckp_path):
        print(f"No checkpoint found at {ckp_path}: starting from scratch.")
        return
    print(f"Found checkpoint at {ckp_path}")
    checkpoint = safe_load(ckp_path)
    for key, value in kwargs.items():
        if key in checkpoint and value is not None:
            state = checkpoint[key]
            if isinstance(value, torch.nn.Module):
                msg = value.load_state_dict(_match_prefix(state, value), strict=False)
                print(f"=> loaded '{key}' from checkpoint '{ckp_path}' with msg {msg}")
            else:
                try:
                    value.load_state_dict(state)
                except ValueError as err:
                    raise ValueError(f"could not load '{key}' from {ckp_path}: {err}") from err
                print(f"=> loaded '{key}' from checkpoint: '{ckp_path}'")
        else:
            print(f"=> key '{key}' not found in checkpoint: '{ckp_path}'")
    if run_variables is not None:
        for var_name in run_variables:
            if var_name in checkpoint:
                run_variables[var_name] = checkpoint[var_name]
