"""Fault tolerance of pre-training: RNG state capture, graceful stop on signals, resumable epochs.

* :func:`capture_rng_state` / :func:`restore_rng_state` — Python ``random``, NumPy, torch CPU and every
  CUDA generator, as plain lists / tensors so that the state loads with ``torch.load(weights_only=True)``.
* :class:`StopOnSignal` — context manager: the first SIGTERM (cluster pre-emption) or SIGINT (Ctrl-C)
  only sets a flag; the trainer saves a checkpoint at the end of the current step and raises
  :class:`TrainingInterrupted`. A second SIGINT raises ``KeyboardInterrupt`` at once.
* :class:`ResumableSampler` — ``DistributedSampler`` that can start an epoch at a given position of its
  (seed, epoch)-determined order, so a mid-epoch resume skips exactly the batches already trained.
* :class:`StepBoundaryLoader` — wraps the ``DataLoader``; calls back after every optimisation step (when
  the training loop asks for the next batch, the previous step is complete) and tells
  ``train_one_epoch`` (``start_iter``) which in-epoch index the first batch has.
"""
import random
import re
import signal
import threading

import numpy as np
import torch

__all__ = ["TrainingInterrupted", "capture_rng_state", "restore_rng_state", "StopOnSignal",
           "ResumableSampler", "StepBoundaryLoader", "EXIT_CODES", "CollectiveTimeoutError",
           "as_collective_timeout", "LoaderWorkerKilledError", "as_worker_killed"]

#: process exit status of ``main_ibot.py`` after a signal-triggered checkpoint-and-stop
EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}


class TrainingInterrupted(Exception):
    """Training stopped on request (signal) after saving a checkpoint; ``exit_code`` for the process."""

    def __init__(self, message, signal_name="SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 1)


class CollectiveTimeoutError(TrainingInterrupted):
    """A collective waited longer than ``--dist_timeout`` for the other ranks (exit status 1)."""

    def __init__(self, message):
        super().__init__(message, signal_name="timeout")


_TIMEOUT_WORDS = ("timed out", "timeout")


def as_collective_timeout(err, timeout_s, where):
    """A :class:`CollectiveTimeoutError` for ``err`` when it is a process-group timeout (gloo:
    ``Timed out waiting 1800000ms for recv operation``; NCCL's watchdog aborts the process itself, with
    a message naming ``OpType`` and ``Timeout(ms)``), else None. ``where``: the training position."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not any(w in text.lower() for w in _TIMEOUT_WORDS):
        return None
    detail = text.strip().splitlines()[0]
    detail = detail.split("] ", 1)[1] if detail.startswith("[") and "] " in detail else detail
    return CollectiveTimeoutError(
        f"a collective operation of the process group (gradient all-reduce, loss centre all-reduce or the "
        f"stop-flag all-reduce) waited longer than --dist_timeout {timeout_s:g} s {where}: another rank has "
        f"stalled (stopped, hung I/O, swapping) or died. Backend said: {detail}. The last checkpoint is intact; "
        f"continue with --auto_resume true once every node is healthy")


class LoaderWorkerKilledError(TrainingInterrupted):
    """A DataLoader worker process was killed by a signal (exit status 1)."""

    def __init__(self, message):
        super().__init__(message, signal_name="worker")


def as_worker_killed(err, num_workers):
    """A :class:`LoaderWorkerKilledError` for the ``RuntimeError`` a ``DataLoader`` raises when a worker
    dies (``DataLoader worker (pid 123) is killed by signal: Killed.``), naming the signal and the
    remedy; None for other errors."""
    text = str(err)
    if not isinstance(err, RuntimeError) or "DataLoader worker" not in text:
        return None
    m = re.search(r"pid\(?s?\)?\s*([\d, ]+)\)?\s*(?:is killed by signal|exited unexpectedly)[: ]*([^.]*)", text)
    pid = m.group(1).strip() if m else "?"
    sig = (m.group(2).strip() if m and m.group(2).strip() else "unknown")
    names = {"Killed": "SIGKILL", "Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Aborted": "SIGABRT",
             "Terminated": "SIGTERM"}
    signame = names.get(sig, sig)
    hint = (" (SIGKILL usually means the kernel's out-of-memory killer)" if signame == "SIGKILL" else
            " (SIGBUS usually means /dev/shm is too small for the batches)" if signame == "SIGBUS" else "")
    return LoaderWorkerKilledError(
        f"a data-loading worker (pid {pid}) was killed by signal {signame}{hint}. Remedy: lower --num_workers "
        f"(now {num_workers}) or --batch_size_per_gpu, give the job more memory (and /dev/shm), then continue "
        f"with --auto_resume true: the run resumes exactly from its last checkpoint")


# ----------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------
def capture_rng_state():
    """All global RNG states of this process, as weights-only-loadable objects.

    Returns ``{'python': [version, [625 ints], gauss], 'numpy': {...}, 'torch': ByteTensor,
    'cuda': [ByteTensor per device]}``.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng_state(state):
    """Inverse of :func:`capture_rng_state` (CUDA states are restored for the devices present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], device=i)


# ----------------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------------
class StopOnSignal:
    """Turn SIGTERM / SIGINT into a stop request polled at safe points (context manager).

    Handlers are only installed from the main thread; previous handlers are put back on exit. DataLoader
    workers forked meanwhile inherit the flag-only handler, so a signal sent to the whole process
    group does not kill them mid-batch.
    """

    def __init__(self, signals=("SIGTERM", "SIGINT")):
        self.signals = [getattr(signal, s) for s in signals if hasattr(signal, s)]
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    @property
    def signal_name(self):
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum=signal.SIGTERM):
        """Ask for a stop as if ``signum`` had been received (used by tests and other code)."""
        self.signum = signum

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            print(f"Received {signal.Signals(signum).name}: saving a checkpoint at the end of the current "
                  f"step, then stopping.", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()
        return False


# ----------------------------------------------------------------------------------------------------
# data order
# ----------------------------------------------------------------------------------------------------
class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` whose next epoch can start at position ``start_index`` of its order.

    The order itself is the parent's (a function of ``seed`` and ``set_epoch``), so skipping the first
    ``k · batch_size`` indices skips exactly the first ``k`` batches of that epoch. ``start_index`` is
    reset to 0 by :meth:`set_epoch`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.start_index = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self):
        return max(self.num_samples - self.start_index, 0)


class StepBoundaryLoader:
    """Iterable over a ``DataLoader`` epoch that calls ``on_step_end(done)`` after each training step.

    ``done`` = number of batches of this epoch finished (counting those skipped by a resume). The
    callback runs when the consumer asks for the next batch, i.e. after the previous step (forward,
    backward, optimizer, EMA, bookkeeping) is complete, and once more after the last batch. ``len()`` is
    the full number of batches of an epoch; ``start_iter`` is the in-epoch index of the first batch
    yielded (``train_one_epoch`` enumerates from it, so schedules use the right global step).
    """

    def __init__(self, loader, num_batches, on_step_end=None):
        self.loader = loader
        self.num_batches = num_batches
        self.on_step_end = on_step_end
        self.start_iter = 0

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_size(self):
        return self.loader.batch_size

    def skip(self, batches):
        """Start the next epoch at batch ``batches`` (call after ``sampler.set_epoch``)."""
        self.start_iter = int(batches)
        self.loader.sampler.start_index = self.start_iter * self.loader.batch_size

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        done = self.start_iter
        try:
            for batch in self.loader:
                yield batch
                done += 1
                if self.on_step_end is not None:
                    self.on_step_end(done)
        finally:
            self.start_iter = 0
            self.loader.sampler.start_index = 0
