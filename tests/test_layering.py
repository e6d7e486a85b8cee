"""The package's layering: scripts and doors -> ``ibot`` -> nothing of the repository outside it.

No module under ``ibot/`` imports ``evaluation``, ``analysis``, ``benchmarks``, ``tools`` or the
top-level doors (``main_ibot``, ``utils``, ``loader``, ``models``), at any depth (imports inside
functions and ``importlib.import_module`` / ``__import__`` with a constant name included), and none
touches ``sys.path``. ``pip install .`` gives a package that works away from the checkout.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"evaluation", "analysis", "benchmarks", "tools", "tests", "main_ibot", "utils", "loader", "models",
             "extract_backbone_weights"}


def _imported_names(tree):
    """Top-level module names imported anywhere in ``tree`` (absolute imports only)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def test_package_imports_nothing_outside_it():
    offenders = []
    for path in sorted((REPO / "ibot").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for lineno, name in _imported_names(tree):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.relative_to(REPO)}:{lineno} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_layering_check_sees_function_level_and_dynamic_imports():
    """Negative control: the walker finds an import inside a function and an import_module call."""
    tree = ast.parse("def f():\n    import evaluation.eval_knn\n    importlib.import_module('models')\n")
    assert [name for _, name in _imported_names(tree)] == ["evaluation.eval_knn", "models"]


def test_no_package_module_touches_sys_path():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "ibot").rglob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, offenders


@pytest.mark.slow
def test_pip_install_gives_a_working_package(tmp_path):
    """``pip install .`` into a fresh virtual environment (dependencies already satisfied through the
    project's environment), then, from another directory, ``import ibot`` builds ``vit_small`` through
    the registry and loads the official fixture checkpoint (its 2-block ViT) through the package — from the installed copy, not the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the project's environment (torch, timm, pip, setuptools ...) is visible to the new one
    parent_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent_env.pth").write_text(parent_site + "\n")
    # the parent environment holds an editable install of this checkout: hide it in the new one
    env = dict(os.environ, PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    # --no-deps: the dependencies are those of the project's environment; their declaration is checked below
    build = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--target",
                            str(tmp_path / "installed"), str(REPO)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    installed = tmp_path / "installed"
    assert (installed / "ibot" / "models" / "registry.py").is_file()
    assert not (installed / "evaluation").exists() and not (installed / "tests").exists()
    metadata = next(installed.glob("*.dist-info")) / "METADATA"
    requires = [line.split(":", 1)[1].strip().split()[0].split(">")[0].split("<")[0].split("=")[0]
                for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist:")]
    assert {"torch", "torchvision", "timm", "numpy"} <= set(requires), requires
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import ibot, ibot.models as m; from ibot.eval.weights import load_pretrained_weights;"
        "assert ibot.__file__.startswith(sys.argv[1]), ibot.__file__;"
        "net = m.create_model('vit_small', patch_size=8, img_size=32, num_classes=0);"
        "assert type(net).__name__ == 'VisionTransformer' and net.embed_dim == 384;"
        "import functools, torch;"
        "small = m.VisionTransformer(patch_size=8, img_size=32, embed_dim=48, depth=2, num_heads=3, qkv_bias=True,"
        " norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6));"
        "load_pretrained_weights(small, sys.argv[2], 'teacher', 'vit_small', 8);"
        "print('ok', ibot.__file__)")
    ckpt = REPO / "tests" / "fixtures" / "official" / "official_checkpoint.pth"
    run = subprocess.run([str(py), "-c", code, str(installed), str(ckpt)], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1].startswith("ok"), run.stdout[-2000:]
