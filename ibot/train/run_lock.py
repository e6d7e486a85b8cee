"""One run per output folder: a lock file ``<output_dir>/run.lock`` held by the run's rank 0.

The file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds JSON: ``host``,
``pid``, ``pid_start`` (the process start time from ``/proc``, so that a reused pid is not taken for
the old run) and ``started`` (UTC, ISO 8601). A second run on the folder refuses with
:class:`RunLockError` naming them. A lock whose process is gone (same host, pid dead or reused) is
taken over with a note; a lock from another host cannot be checked from here and is refused, with
the file to delete when that run is known to be over.
"""
import datetime
import json
import os
import socket

LOCK_NAME = "run.lock"
_HELD = set()  # lock paths held by this process (a stale lock with our own pid is then ours)


class RunLockError(RuntimeError):
    """Another (live, or unverifiable) run holds the output folder."""


def _process_start(pid):
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, pid_start):
    """Whether process ``pid`` (started at ``pid_start`` ticks, if known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now_start = _process_start(pid)
    return pid_start is None or now_start is None or now_start == pid_start


def describe(record):
    """``host <h>, process id <p>, started <t>`` of a lock record."""
    return f"host {record.get('host')}, process id {record.get('pid')}, started {record.get('started')}"


class RunLock:
    """Context manager holding ``<output_dir>/run.lock`` for the duration of a run.

    ``acquire`` raises :class:`RunLockError` when a live run holds the folder, takes over a stale lock
    (printing a note) and writes this process's record; ``release`` removes the file if it is still
    ours. Only the main process of a distributed run should hold it (the others share its folder).
    """

    def __init__(self, output_dir):
        self.path = os.path.join(os.fspath(output_dir), LOCK_NAME)
        self.record = None

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _create(self):
        record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.write("\n")
        self.record = record
        _HELD.add(self.path)

    def acquire(self):
        """Take the lock (see the class docstring); returns self."""
        for _ in range(3):  # a lock released or taken over meanwhile: try again
            try:
                self._create()
                return self
            except FileExistsError:
                pass
            held = self._read()
            if held is None:  # empty or half-written: a run killed while creating it, or one creating it now
                held = {"host": "unknown", "pid": None, "started": "unknown"}
            mine = held.get("pid") == os.getpid() and self.path in _HELD
            same_host = held.get("host") == socket.gethostname()
            pid = held.get("pid")
            if mine or (isinstance(pid, int) and same_host and not _alive(pid, held.get("pid_start"))):
                # mine: an earlier run of this process (runs in one process are sequential) that ended
                # before releasing it
                print(f"Note: taking over {self.path}: it was left by a run that is no longer alive "
                      f"({describe(held)}).", flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            if not same_host and held.get("host") != "unknown":
                raise RunLockError(
                    f"--output_dir {os.path.dirname(self.path)} is in use by another run ({describe(held)}); "
                    f"that host cannot be checked from here: if that run is over, delete {self.path}")
            if held.get("host") == "unknown":
                raise RunLockError(f"--output_dir {os.path.dirname(self.path)} holds an unreadable {self.path}; "
                                   "if no other run uses the folder, delete it")
            raise RunLockError(f"--output_dir {os.path.dirname(self.path)} is in use by a live run "
                               f"({describe(held)}); use another --output_dir or stop that run")
        raise RunLockError(f"could not take {self.path}: other runs keep creating it")

    def release(self):
        """Remove the lock file if it still holds this process's record."""
        if self.record is None:
            return
        held = self._read()
        if held is not None and held.get("pid") == self.record["pid"] and held.get("host") == self.record["host"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        _HELD.discard(self.path)
        self.record = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
