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
