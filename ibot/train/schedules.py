"""Per-iteration schedules (learning rate, weight decay, teacher momentum), of pre-training and of the
BEiT fine-tuning recipe (one function)."""
import numpy as np


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0,
                     warmup_steps=-1):
    """Official iBOT/DINO schedule: linear warm-up then a half cosine, one value per iteration.

    Linear warm-up from ``start_warmup_value`` to ``base_value`` over ``warmup_epochs * niter_per_ep``
    iterations, then ``final + (base - final)(1 + cos(pi i / n)) / 2`` for i = 0..n-1 over the n
    remaining iterations. As in the official code the base value appears twice (end of warm-up,
    start of the cosine) and ``final_value`` is never reached exactly.

    The BEiT fine-tuning recipe's extras: ``warmup_steps`` > 0 replaces ``warmup_epochs *
    niter_per_ep``; fractional ``epochs`` / ``warmup_epochs`` are truncated to whole iterations; a
    warm-up longer than the run is cut at its end. For the official arguments the values are the
    official ones.

    Returns a float64 array of length ``int(epochs * niter_per_ep)``.
    """
    total = int(epochs * niter_per_ep)
    warmup_iters = int(warmup_epochs * niter_per_ep)
    if warmup_steps is not None and warmup_steps > 0:
        warmup_iters = int(warmup_steps)
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == total
    return schedule
