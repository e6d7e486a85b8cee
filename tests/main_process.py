"""Helpers of the tests that run ``main_ibot.py`` (or another Python child) in a subprocess."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra):
    """The environment of a child process: one torch thread, unbuffered output, no launcher variables
    of this process (so the child is a plain process unless ``extra`` says otherwise)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def spawn_main(argv, log):
    """``main_ibot.py argv`` in the background, stdout and stderr to the file ``log``."""
    return subprocess.Popen([sys.executable, str(REPO / "main_ibot.py"), *argv], cwd=str(REPO), env=child_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(log, pattern, proc, timeout=240):
    """Poll ``log`` until ``pattern`` appears; fail (with the log's tail) if ``proc`` ends first, kill it
    and fail after ``timeout`` seconds."""
    start = time.time()
    while time.time() - start < timeout:
        if re.search(pattern, Path(log).read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {pattern!r}:\n"
                                 + Path(log).read_text()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timeout waiting for {pattern!r}")
