"""Load a file of the repository (a script, benchmark or example, which are not in the package) as a
module under a name of its own, so that it never shadows the top-level doors (``loader.py``, ...)."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_repo_file(rel_path):
    """The module of ``REPO/rel_path`` (e.g. ``"benchmarks/loader.py"``), executed afresh on each call."""
    name = "repo_" + rel_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, rel_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
