"""The library face: examples/own_training_loop.py pre-trains with the package's pieces inside a plain
user-written PyTorch loop."""
import math

import torch
from repo_files import load_repo_file


def _load_example():
    return load_repo_file("examples/own_training_loop.py")


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
