"""The library face: examples/own_training_loop.py pre-trains with the package's pieces inside a plain
user-written PyTorch loop."""
import importlib.util
import math
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location("own_training_loop",
                                                  os.path.join(REPO, "examples", "own_training_loop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_training_loop_trains_a_few_steps(fmnist_small):
    """Four steps on the Fashion-MNIST folder: finite losses, a [CLS] term near ln K at the start (random
    init, K = 256 prototypes), and a teacher that follows the student by EMA (moved, but not equal)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        example = _load_example()
        history, step = example.main(["--data", str(fmnist_small / "train"), "--steps", "4", "--batch_size", "8"])
    finally:
        torch.set_num_threads(threads)
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)
    assert abs(history[0]["cls"] - math.log(256)) < 0.5
    pairs = list(zip(*step.ema_pairs))
    assert pairs
    moved = [not torch.equal(s, t) for s, t in pairs]
    assert any(moved)  # the student trained, the teacher lags behind by the EMA
    diff = max((s - t).abs().max().item() for s, t in pairs)
    assert 0 < diff < 1.0
