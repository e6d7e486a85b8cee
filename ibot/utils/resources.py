"""What the training process holds right now: resident memory and open file descriptors.

Written into every epoch's line of ``log.txt`` so that growth over a long run (loggers, loaders,
k-NN evaluations, checkpoints) shows up in the record instead of as an out-of-memory kill on day 3.
"""
import gc
import os
import resource
import sys


def _proc_status_kib(field):
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib():
    """Resident set size of this process in MiB. Linux: the current value (``VmRSS``); elsewhere the
    peak (``ru_maxrss``), which is all the standard library offers."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def open_fds():
    """Number of file descriptors this process holds open (sockets, pipes and files included);
    None where neither ``/proc/self/fd`` nor ``/dev/fd`` can be listed."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # minus the descriptor listdir itself opened
        except OSError:
            continue
    return None


def process_resources():
    """``{"proc_rss_mib": float, "proc_open_fds": int}`` of this process, keys with no value left out.

    Runs the garbage collector first, so that loader iterators and files dropped at the end of the
    epoch but still held by a reference cycle are not counted (they would make the figures jitter)."""
    gc.collect()
    figures = {"proc_rss_mib": round(rss_mib(), 1), "proc_open_fds": open_fds()}
    return {k: v for k, v in figures.items() if v is not None}
