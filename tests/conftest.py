"""Shared test set-up: small Fashion-MNIST folders built once per session from the Debian package."""
import pytest


@pytest.fixture(scope="session")
def fmnist_folder(tmp_path_factory):
    """The one Fashion-MNIST folder factory of the suite: ``fmnist_folder(per_class_train,
    per_class_val, size=32)`` returns the root (``train/`` and ``val/`` of RGB PNGs, built from Debian's
    ``dataset-fashion-mnist`` by :func:`ibot.data.fmnist.build_fmnist_folder`), built once per session
    and size. Fails with the package's message when the IDX files are missing."""
    from ibot.data.fmnist import build_fmnist_folder
    built = {}

    def make(per_class_train, per_class_val, size=32):
        key = (per_class_train, per_class_val, size)
        if key not in built:
            root = tmp_path_factory.mktemp(f"fmnist{size}_{per_class_train}_{per_class_val}")
            build_fmnist_folder(str(root), size=size, per_class_train=per_class_train, per_class_val=per_class_val)
            built[key] = root
        return built[key]
    return make


@pytest.fixture(scope="session")
def fmnist_small(fmnist_folder):
    """Fashion-MNIST 32-px ImageFolder: 30 train + 10 val images per class (300 / 100)."""
    return fmnist_folder(30, 10)


@pytest.fixture(autouse=True)
def _restore_print():
    """``setup_for_distributed`` replaces ``builtins.print``; put the original back after each test."""
    import builtins
    original = builtins.print
    yield
    builtins.print = original


@pytest.fixture(scope="session")
def fmnist_teacher(tmp_path_factory, fmnist_folder):
    """The small-image recipe pre-trained once per session (tests/pretrained_teacher.py):
    ``.checkpoint``, ``.data`` (300/100 per class), ``.log``, ``.arch``, ``.patch_size``.
    ``IBOT_FMNIST_TEACHER`` names an existing checkpoint.pth of that script to reuse instead."""
    import os
    from pretrained_teacher import PER_CLASS, pretrain_fmnist_teacher, reuse_fmnist_teacher
    workdir = str(tmp_path_factory.mktemp("fmnist_teacher"))
    data = str(fmnist_folder(*PER_CLASS))
    reuse = os.environ.get("IBOT_FMNIST_TEACHER")
    if reuse:
        return reuse_fmnist_teacher(reuse, data)
    return pretrain_fmnist_teacher(workdir, data)
