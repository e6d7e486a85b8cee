"""Small run-level helpers: boolean flags, seeding and the git revision printed at start-up."""
import argparse
import os
import random
import subprocess

import numpy as np
import torch

_TRUE = {"on", "true", "1"}
_FALSE = {"off", "false", "0"}


def bool_flag(s):
    """Parse an official boolean flag: ``on/true/1`` → True, ``off/false/0`` → False (any case)."""
    value = str(s).lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (use true/false, on/off or 1/0)")


def fix_random_seeds(seed=31):
    """Seed Python ``random``, NumPy and torch (CPU and every GPU) with the same ``seed``."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)


def get_sha():
    """Return ``'sha: <commit>, status: <clean|has uncommitted changes>, branch: <name>'`` of this checkout."""
    cwd = os.path.dirname(os.path.abspath(__file__))

    def _run(command):
        return subprocess.check_output(command, cwd=cwd, stderr=subprocess.DEVNULL).decode("ascii").strip()

    sha, diff, branch = "N/A", "clean", "N/A"
    try:
        sha = _run(["git", "rev-parse", "HEAD"])
        subprocess.check_output(["git", "diff"], cwd=cwd, stderr=subprocess.DEVNULL)
        diff = "has uncommitted changes" if _run(["git", "diff-index", "HEAD"]) else "clean"
        branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"])
    except Exception:
        pass
    return f"sha: {sha}, status: {diff}, branch: {branch}"


def print_run_header(args):
    """Print the git revision, then every flag as ``name: value`` sorted by name (``_*`` entries skipped)."""
    print("git:\n  {}\n".format(get_sha()))
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items()) if not k.startswith("_")))
