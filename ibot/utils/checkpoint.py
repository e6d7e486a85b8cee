"""Safe checkpoint I/O: loading that never runs code from a file, atomic saving, checksums and a
small rolling set of checkpoints.

Official iBOT checkpoints pickle an ``argparse.Namespace`` under ``args``; it is the only non-tensor
global they need, so it is allow-listed for ``torch.load(weights_only=True)``, together with NumPy
scalars and dtypes (``args`` written by scripts that keep NumPy values in the Namespace: rebuilding
them only reads bytes, it calls nothing else).

Checksums: :func:`save_checkpoint` writes ``<file>.sha256`` beside the checkpoint, a small JSON file
``{"sha256": hex digest, "bytes": size}``; :func:`safe_load` checks it before unpickling anything and
names what is wrong (zero-length, truncated, content changed). A file without one (official
checkpoints, older runs) loads as before. The sidecar is written before the checkpoint is renamed into
place and then also accepts the previous content (``previous``), so a process killed between the two
renames leaves a pair that still verifies.

Rolling set: with ``keep = N > 1``, the checkpoint being replaced is first hard-linked (copied where
links are not supported) to ``<file>.1``, older ones shift to ``<file>.2`` ... ``<file>.{N-1}``;
:func:`rolling_checkpoints` lists them newest first and :func:`load_newest_intact` picks the first
that verifies and loads.
"""
import argparse
import errno as errno_codes
import hashlib
import json
import os
import pickle
import shutil
import tempfile

import numpy as np
import torch


def _numpy_globals():
    """What a pickled NumPy scalar needs: ``multiarray.scalar`` (its module moved in NumPy 2), the
    ``dtype`` constructor and, in NumPy >= 1.25, the per-type dtype classes."""
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [cls for cls in vars(dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return found


SAFE_GLOBALS = [argparse.Namespace] + _numpy_globals()
_TMP_PREFIX = ".tmp-"


class UnsafeCheckpointError(RuntimeError):
    """Raised when a file would need arbitrary unpickling (and so could run code) to load."""


class CorruptCheckpointError(RuntimeError):
    """Raised when a checkpoint file is truncated or not a ``torch.save`` file."""


class DamagedCheckpointError(CorruptCheckpointError):
    """A checkpoint does not match the checksum written beside it (or is empty); the message says how."""


CHECKSUM_SUFFIX = ".sha256"
_CHUNK = 1 << 20


def checksum_path(path):
    """The checksum sidecar of checkpoint ``path``: ``<path>.sha256``."""
    return os.fspath(path) + CHECKSUM_SUFFIX


def file_digest(path):
    """``(SHA-256 hex digest, size in bytes)`` of the file at ``path`` (read in 1 MiB chunks)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest(), size
            h.update(block)
            size += len(block)


def read_checksum(path):
    """The sidecar of ``path`` as a dict (``sha256``, ``bytes``, optional ``previous``), or None when
    there is none. An unreadable sidecar raises :class:`DamagedCheckpointError` naming it."""
    side = checksum_path(path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side) as f:
            record = json.load(f)
        record["sha256"], record["bytes"] = str(record["sha256"]), int(record["bytes"])
        return record
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpointError(f"checksum file {side} of {path} is unreadable ({err}); "
                                     f"cannot tell whether the checkpoint is intact") from None


def verify_checkpoint(path):
    """Check ``path`` against its sidecar before anything is unpickled.

    Returns True when it matches, False when there is no sidecar (official or older checkpoints; a
    zero-length file is refused anyway). Raises :class:`DamagedCheckpointError` saying whether the file
    is zero-length, truncated (bytes found vs recorded), longer than recorded, or of the right size but
    with other content (a flipped bit or an overwrite).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    record = read_checksum(path)
    if size == 0:
        expected = f"; {checksum_path(path)} records {record['bytes']} bytes" if record else ""
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: zero-length file (0 bytes{expected})")
    if record is None:
        return False
    accepted = [record] + ([record["previous"]] if isinstance(record.get("previous"), dict) else [])
    sizes = [int(r["bytes"]) for r in accepted]
    if size not in sizes:
        how = "truncated" if size < sizes[0] else "longer than recorded"
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {how} ({size} bytes, "
                                     f"{checksum_path(path)} records {sizes[0]})")
    digest, _ = file_digest(path)
    if digest not in [str(r["sha256"]) for r in accepted]:
        raise DamagedCheckpointError(
            f"checkpoint {path} is damaged: its content does not match its SHA-256 checksum "
            f"(found {digest[:16]}..., {checksum_path(path)} records {record['sha256'][:16]}...; same size, "
            f"so bytes were changed in place, e.g. a flipped bit)")
    return True


def safe_load(path, map_location="cpu", verify=True):
    """Load a ``torch.save`` file with ``weights_only=True`` (plus ``argparse.Namespace``).

    Returns whatever the file holds (usually a dict of tensors / state dicts). Raises
    ``FileNotFoundError`` naming the path when it is missing, :class:`DamagedCheckpointError` when
    ``verify`` and the file does not match its checksum sidecar (checked first; see
    :func:`verify_checkpoint`) and ``UnsafeCheckpointError`` when the file would need to unpickle other
    objects: such a file is refused, never executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if verify:
        verify_checkpoint(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs objects that weights-only loading does not allow "
            f"(only tensors, containers, argparse.Namespace and NumPy scalars are accepted, so that no "
            f"file can run code). Details: {err}") from None
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


_SPACE_ERRNOS = {errno_codes.ENOSPC, errno_codes.EFBIG, getattr(errno_codes, "EDQUOT", -1)}


def _os_error_in_chain(err):
    """The first ``OSError`` in ``err``'s cause/context chain: torch's zip writer reports a failed
    ``write`` (full disk, quota, file-size limit) as a ``RuntimeError`` whose context is the OSError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def state_nbytes(obj):
    """Bytes held by the tensors inside ``obj`` (nested dicts / lists / tuples): the size of a
    ``torch.save`` file of ``obj`` up to its small pickle and zip overhead."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _write_error(err, obj, path):
    """A :class:`CheckpointWriteError` for ``err``; for a full disk, a quota or a file-size limit it names
    the folder, the bytes the checkpoint needs and the bytes free."""
    folder = os.path.dirname(os.path.abspath(path))
    os_err = _os_error_in_chain(err)
    errno_ = os_err.errno if os_err is not None else getattr(err, "errno", None)
    reason = (os_err.strerror if os_err is not None else None) or f"{type(err).__name__}: {err}"
    if errno_ in _SPACE_ERRNOS:
        try:
            free = f"{shutil.disk_usage(folder).free} bytes free on its file system"
        except OSError:
            free = "free space unknown"
        limit = (" (a file-size limit: ulimit -f / RLIMIT_FSIZE)" if errno_ == errno_codes.EFBIG else
                 " (a disk quota)" if errno_ == getattr(errno_codes, "EDQUOT", -1) else "")
        return CheckpointWriteError(errno_, (
            f"could not write checkpoint {path} ({reason}{limit}): folder {folder} needs about "
            f"{state_nbytes(obj)} bytes for it, {free}; nothing half-written is left and the previous "
            f"file at that path, if any, is intact. Free space or point --output_dir elsewhere"))
    return CheckpointWriteError(errno_, f"could not write checkpoint {path} ({reason}); "
                                        f"the previous file at that path, if any, is intact")


def _write_temp(obj, path):
    """``torch.save`` ``obj`` to a fsynced temporary file beside ``path``; returns its name. On any
    failure the temporary file is removed and a :class:`CheckpointWriteError` raised."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + "-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(err, Exception):
            raise
        raise _write_error(err, obj, path) from err


def _write_text_atomic(text, path):
    """Small text file written through a temporary file and a rename (``os.rename``: atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + "-", dir=os.path.dirname(
        os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_checksum(path, digest, size, previous=None):
    record = {"sha256": digest, "bytes": size, "file": os.path.basename(path)}
    if previous:
        record["previous"] = {"sha256": previous["sha256"], "bytes": previous["bytes"]}
    _write_text_atomic(json.dumps(record) + "\n", checksum_path(path))


def previous_checkpoint_path(path, k):
    """Name of the ``k``-th older checkpoint of the rolling set of ``path``: ``<path>.<k>`` (logrotate
    style, so that globs like ``checkpoint*.pth`` still list only the official files)."""
    return f"{os.fspath(path)}.{k}"


def rolling_checkpoints(path):
    """The existing files of the rolling set of ``path``, newest first: ``path``, ``<path>.1``, ..."""
    found = [os.fspath(path)] if os.path.isfile(path) else []
    k = 1
    while os.path.isfile(previous_checkpoint_path(path, k)):
        found.append(previous_checkpoint_path(path, k))
        k += 1
    return found


def _move_with_checksum(src, dst):
    os.rename(src, dst)
    if os.path.isfile(checksum_path(src)):
        os.rename(checksum_path(src), checksum_path(dst))
    elif os.path.isfile(checksum_path(dst)):
        os.remove(checksum_path(dst))


_WRITTEN = {}  # path -> (inode, size, mtime_ns) of the files this process wrote and hashed itself


def _stat_key(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _is_intact(path):
    """Whether ``path`` may enter the rolling set: unchanged since this process wrote it, or verified."""
    try:
        if _WRITTEN.get(path) == _stat_key(path):
            return True
        verify_checkpoint(path)
        return True
    except (OSError, DamagedCheckpointError):
        return False


def _rotate(path, keep):
    """Shift the rolling set of ``path`` by one, keeping ``keep - 1`` older files; the current ``path``
    is hard-linked (copied where links fail) to ``<path>.1``, so ``path`` itself stays in place. A damaged
    ``path`` (e.g. the one a resume fell back from) is not rotated in: it would push out an intact file."""
    k = 1
    while os.path.isfile(previous_checkpoint_path(path, k)):
        k += 1
    for j in range(k - 1, keep - 1, -1):  # beyond the set (e.g. --keep_checkpoints lowered)
        for f in (previous_checkpoint_path(path, j), checksum_path(previous_checkpoint_path(path, j))):
            if os.path.exists(f):
                os.remove(f)
    if keep < 2 or not os.path.isfile(path) or not _is_intact(path):
        return
    for j in range(min(k, keep - 1), 1, -1):
        _move_with_checksum(previous_checkpoint_path(path, j - 1), previous_checkpoint_path(path, j))
    first = previous_checkpoint_path(path, 1)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), _TMP_PREFIX + os.path.basename(path) + "-link")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.rename(tmp, first)
    if os.path.isfile(checksum_path(path)):
        shutil.copyfile(checksum_path(path), checksum_path(first))
    elif os.path.isfile(checksum_path(first)):
        os.remove(checksum_path(first))


def save_checkpoint(obj, path, keep=1):
    """Write ``obj`` to ``path`` atomically with a SHA-256 sidecar, keeping a rolling set of ``keep``.

    Order: the new file is written and fsynced under a temporary name (a failure here, e.g. a full disk,
    changes nothing: :class:`CheckpointWriteError` names the folder and the bytes needed); then the
    rolling set shifts (``path`` -> ``<path>.1`` by a hard link, ...); the sidecar is written accepting
    both the new and the old content; ``path`` is replaced; the sidecar is narrowed to the new content.
    """
    path = os.fspath(path)
    tmp = _write_temp(obj, path)
    try:
        digest, size = file_digest(tmp)
        try:
            previous = read_checksum(path) if os.path.isfile(path) else None
        except DamagedCheckpointError:
            previous = None  # an unreadable sidecar is replaced below
        _rotate(path, int(keep))
        _write_checksum(path, digest, size, previous=previous)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(err, Exception):
            raise
        if isinstance(err, CheckpointWriteError):
            raise
        raise _write_error(err, obj, path) from err
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    try:
        _write_checksum(path, digest, size)
    except OSError:
        pass  # the sidecar written before the rename already accepts the new content
    _WRITTEN[path] = _stat_key(path)


def load_newest_intact(paths, map_location="cpu"):
    """Verify and load ``paths`` in order (newest first); returns ``(path, checkpoint, problems)`` for
    the first that is intact, ``problems`` naming what was wrong with those skipped. When none is
    intact, returns ``(None, None, problems)``. Unsafe files (code on unpickling) are never skipped
    silently: :class:`UnsafeCheckpointError` propagates."""
    problems = []
    for path in paths:
        try:
            return path, safe_load(path, map_location=map_location), problems
        except CorruptCheckpointError as err:
            problems.append(str(err))
    return None, None, problems


def remove_stale_temp_files(folder):
    """Delete ``.tmp-*`` files left in ``folder`` by :func:`atomic_save` calls killed mid-write.

    Returns the removed paths.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(_TMP_PREFIX) and (".pth-" in name or ".sha256-" in name):
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


def restart_from_checkpoint(ckp_path, run_variables=None, checkpoint=None, **kwargs):
    """Official resume helper, with safe loading: load ``ckpt[name]`` into each object passed by name.

    Modules are loaded with ``strict=False`` (official), after matching the ``module.`` prefix; the
    result (missing/unexpected keys) is printed. Objects without ``strict`` (optimizer, GradScaler) are
    loaded plainly. Entries of ``run_variables`` found in the file are copied into it. A missing file
    is ignored, as in the official code, but said. ``checkpoint``: the contents of ``ckp_path`` when
    the caller has already verified and loaded them.
    """
    if checkpoint is None and not os.path.isfile(ckp_path):
        print(f"No checkpoint found at {ckp_path}: starting from scratch.")
        return
    print(f"Found checkpoint at {ckp_path}")
    if checkpoint is None:
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
