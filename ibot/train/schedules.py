"""Per-iteration schedules (learning rate, weight decay, teacher momentum)."""
import numpy as np


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Official iBOT/DINO schedule: linear warm-up then a half cosine, one value per iteration.

    Returns a float64 array of length ``epochs * niter_per_ep``. As in the official code the base value
    appears twice (end of warm-up, start of the cosine) and ``final_value`` is never reached exactly.
    """
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.array([])
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule
