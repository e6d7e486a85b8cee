"""Shared test set-up: small Fashion-MNIST folders built once per session from the Debian package."""
import pytest


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    """Fashion-MNIST 32-px ImageFolder: 30 train + 10 val images per class (300 / 100)."""
    from ibot.data.fmnist import build_fmnist_folder
    root = tmp_path_factory.mktemp("fmnist32")
    build_fmnist_folder(str(root), size=32, per_class_train=30, per_class_val=10)
    return root


@pytest.fixture(autouse=True)
def _restore_print():
    """``setup_for_distributed`` replaces ``builtins.print``; put the original back after each test."""
    import builtins
    original = builtins.print
    yield
    builtins.print = original


@pytest.fixture(scope="session")
def fmnist_teacher(tmp_path_factory):
    """The small-image recipe pre-trained once per session (tests/pretrained_teacher.py):
    ``.checkpoint``, ``.data`` (300/100 per class), ``.log``, ``.arch``, ``.patch_size``.
    ``IBOT_FMNIST_TEACHER`` names an existing checkpoint.pth of that script to reuse instead."""
    import os
    from pretrained_teacher import pretrain_fmnist_teacher, reuse_fmnist_teacher
    workdir = str(tmp_path_factory.mktemp("fmnist_teacher"))
    reuse = os.environ.get("IBOT_FMNIST_TEACHER")
    if reuse:
        return reuse_fmnist_teacher(reuse, workdir)
    return pretrain_fmnist_teacher(workdir)
