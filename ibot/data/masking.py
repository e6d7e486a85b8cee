"""Masked-image-modelling masks with the semantics of the official iBOT ``loader.py``.

Everything here takes an explicit random generator instead of touching global RNG state (allowed by
quirks Q8/Q10 of the specification; the distributions are unchanged):

* a :class:`random.Random` instance (or the :mod:`random` module itself, which exposes the same
  methods and draws from the global Python RNG, as the official code does), or
* a :class:`numpy.random.Generator` (slower for ``block``: every scalar draw goes through NumPy).

Masks are NumPy ``bool`` arrays of shape ``(H, W)`` on the mask grid (``H = crop_h // patch_size``),
``True`` = the token is masked (replaced by ``masked_embed`` in the student).
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Sequence, Tuple, Union

import numpy as np

__all__ = [
    "PRED_SHAPES",
    "DEFAULT_ASPECT_RATIO",
    "normalize_ratio_args",
    "check_mask_args",
    "sample_pred_ratio",
    "block_mask",
    "rand_mask",
    "MaskGenerator",
]

PRED_SHAPES = ("block", "rand")
DEFAULT_ASPECT_RATIO = (0.3, 1 / 0.3)

Ratio = Union[float, Tuple[float, ...]]


class _NumpyRandomAdapter:
    """Expose the few :class:`random.Random` methods used here on top of a NumPy Generator."""

    __slots__ = ("g",)

    def __init__(self, g: np.random.Generator):
        self.g = g

    def random(self) -> float:
        return float(self.g.random())

    def uniform(self, a: float, b: float) -> float:
        # same formula as random.Random.uniform (works for b < a)
        return a + (b - a) * float(self.g.random())

    def randint(self, a: int, b: int) -> int:
        return int(self.g.integers(a, b + 1))

    def choice(self, seq):
        return seq[int(self.g.integers(0, len(seq)))]

    def sample(self, population, k: int):
        idx = self.g.choice(len(population), size=k, replace=False)
        return [population[i] for i in idx]


def _as_random(rng):
    """Return an object with the :class:`random.Random` API for ``rng`` (Random, module or Generator)."""
    if isinstance(rng, np.random.Generator):
        return _NumpyRandomAdapter(rng)
    if rng is None:
        return random
    return rng


def _is_seq(x) -> bool:
    return isinstance(x, (list, tuple, np.ndarray))


def normalize_ratio_args(pred_ratio, pred_ratio_var) -> Tuple[Ratio, Ratio]:
    """Collapse ``--pred_ratio`` / ``--pred_ratio_var`` exactly as the official data set does.

    One-element lists become scalars; a scalar variance is broadcast when the ratio is a list.
    Returns ``(ratio, var)``: both floats, or both tuples of equal length. No validation (see
    :func:`check_mask_args`).
    """
    if _is_seq(pred_ratio) and len(pred_ratio) == 1:
        pred_ratio = pred_ratio[0]
    if _is_seq(pred_ratio_var) and len(pred_ratio_var) == 1:
        pred_ratio_var = pred_ratio_var[0]
    if _is_seq(pred_ratio):
        pred_ratio = tuple(float(r) for r in pred_ratio)
        if _is_seq(pred_ratio_var):
            pred_ratio_var = tuple(float(v) for v in pred_ratio_var)
        else:
            pred_ratio_var = (float(pred_ratio_var),) * len(pred_ratio)
    else:
        pred_ratio = float(pred_ratio)
        if _is_seq(pred_ratio_var):
            pred_ratio_var = tuple(float(v) for v in pred_ratio_var)
        else:
            pred_ratio_var = float(pred_ratio_var)
    return pred_ratio, pred_ratio_var


def check_mask_args(pred_ratio, pred_ratio_var=0.0, pred_shape: str = "block",
                    pred_aspect_ratio=DEFAULT_ASPECT_RATIO) -> Tuple[Ratio, Ratio]:
    """Validate the masking flags; raise ``ValueError`` naming the offending flag.

    Rules: ``--pred_shape`` in ``('block', 'rand')``; ``--pred_ratio_var`` a scalar or a list of the
    same length as ``--pred_ratio``; for every pair ``0 <= var <= ratio`` and ``ratio + var <= 1``
    (the official code only asserts ``var <= ratio``; fractions above 1 cannot be realised).
    ``pred_aspect_ratio`` must be two positive numbers. Returns the normalised ``(ratio, var)``.
    """
    if pred_shape not in PRED_SHAPES:
        raise ValueError(f"--pred_shape must be one of {list(PRED_SHAPES)}, got {pred_shape!r}")
    ratio_list = list(pred_ratio) if _is_seq(pred_ratio) else [pred_ratio]
    var_list = list(pred_ratio_var) if _is_seq(pred_ratio_var) else [pred_ratio_var]
    if len(ratio_list) == 0:
        raise ValueError("--pred_ratio needs at least one value")
    if len(var_list) == 0:
        raise ValueError("--pred_ratio_var needs at least one value")
    for name, vals in (("--pred_ratio", ratio_list), ("--pred_ratio_var", var_list)):
        for v in vals:
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(float(v)):
                raise ValueError(f"{name} values must be finite numbers, got {v!r}")
    if len(var_list) != 1 and len(var_list) != len(ratio_list):
        raise ValueError(
            f"--pred_ratio_var must have one value or as many values as --pred_ratio "
            f"({len(ratio_list)}), got {len(var_list)}: {var_list}")
    ratio, var = normalize_ratio_args(pred_ratio, pred_ratio_var)
    pairs = zip(ratio, var) if isinstance(ratio, tuple) else [(ratio, var)]
    for m, v in pairs:
        if v < 0:
            raise ValueError(f"--pred_ratio_var must be >= 0, got {v}")
        if m < 0:
            raise ValueError(f"--pred_ratio must be >= 0, got {m}")
        if v > m:
            raise ValueError(
                f"--pred_ratio_var ({v}) must not exceed the matching --pred_ratio ({m})")
        if m + v > 1:
            raise ValueError(
                f"--pred_ratio ({m}) + --pred_ratio_var ({v}) must be <= 1 (fraction of patches)")
    if pred_aspect_ratio is not None:
        if not _is_seq(pred_aspect_ratio) or len(pred_aspect_ratio) != 2 \
                or not all(float(a) > 0 for a in pred_aspect_ratio):
            raise ValueError(
                f"pred_aspect_ratio must be two positive numbers, got {pred_aspect_ratio!r}")
    return ratio, var


def sample_pred_ratio(rng, pred_ratio, pred_ratio_var) -> float:
    """Draw the masking ratio of ONE crop (official ``get_pred_ratio`` without the epoch gate).

    List case: for every pair draw ``U(m - v, m + v)`` (or ``m`` if ``v == 0``), then pick one of the
    values uniformly. Scalar case: ``U(m - v, m + v)`` or ``m``. Returns a fraction in [0, 1].
    Arguments should be normalised with :func:`normalize_ratio_args`.
    """
    r = _as_random(rng)
    if isinstance(pred_ratio, tuple):
        vals = [r.uniform(m - v, m + v) if v > 0 else m for m, v in zip(pred_ratio, pred_ratio_var)]
        return float(r.choice(vals))
    if pred_ratio_var > 0:
        return float(r.uniform(pred_ratio - pred_ratio_var, pred_ratio + pred_ratio_var))
    return float(pred_ratio)


def block_mask(rng, height: int, width: int, high: float,
               log_aspect: Tuple[float, float] = (math.log(DEFAULT_ASPECT_RATIO[0]),
                                                   math.log(DEFAULT_ASPECT_RATIO[1]))) -> np.ndarray:
    """BEiT-style block mask as adapted by iBOT; returns bool ``(height, width)``.

    ``high`` = target number of masked cells (float, ``ratio * H * W``). Rectangles are added one per
    outer step (area ``U((min(H,W)//3)**2, budget)``, log-uniform aspect ratio in ``log_aspect``,
    sides rounded half-to-even, strictly smaller than the grid, inclusive ``randint`` placement); a
    rectangle is accepted only if it adds between 1 and ``budget`` new cells; 10 failed attempts end
    the masking. Total masked cells <= floor(high).
    """
    r = _as_random(rng)
    mask = np.zeros((height, width), dtype=bool)
    if high <= 0 or height <= 0 or width <= 0:
        return mask
    uniform, randint = r.uniform, r.randint
    sqrt, exp = math.sqrt, math.exp
    low = (min(height, width) // 3) ** 2
    la, lb = log_aspect
    count = 0
    while count < high:
        budget = high - count
        delta = 0
        for _ in range(10):
            area = uniform(low, budget)
            aspect = exp(uniform(la, lb))
            h = round(sqrt(area * aspect))
            w = round(sqrt(area / aspect))
            if w < width and h < height:
                top = randint(0, height - h)
                left = randint(0, width - w)
                view = mask[top:top + h, left:left + w]
                new = h * w - int(np.count_nonzero(view))
                if 0 < new <= budget:
                    view[...] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def rand_mask(rng, height: int, width: int, high: float) -> np.ndarray:
    """Mask exactly ``int(high)`` cells chosen uniformly at random; returns bool ``(height, width)``.

    ``rng``: a :class:`numpy.random.Generator` (uses ``choice`` without replacement) or anything with
    the :class:`random.Random` API (uses ``sample``). Same distribution as the official shuffle.
    """
    n = height * width
    k = int(high)
    if k > n:
        raise ValueError(f"cannot mask {k} cells of a {height}x{width} grid (--pred_ratio too large)")
    flat = np.zeros(n, dtype=bool)
    if k > 0:
        if isinstance(rng, np.random.Generator):
            idx = rng.choice(n, size=k, replace=False)
        else:
            idx = _as_random(rng).sample(range(n), k)
        flat[idx] = True
    return flat.reshape(height, width)


class MaskGenerator:
    """Per-crop mask sampler: ratio draw (4.2) + ``block`` / ``rand`` mask (4.3).

    ``grid_hw``: default ``(H, W)`` mask grid (may be overridden per call; ``None`` = always give it).
    ``pred_ratio`` / ``pred_ratio_var``: scalars or lists as on the command line (validated with
    :func:`check_mask_args`, which raises ``ValueError`` naming the flag). ``pred_aspect_ratio``:
    (min, max) aspect ratio of blocks. ``pred_shape``: ``'block'`` or ``'rand'``.
    """

    def __init__(self, grid_hw=None, pred_ratio=0.3, pred_ratio_var=0.0,
                 pred_aspect_ratio=DEFAULT_ASPECT_RATIO, pred_shape: str = "block"):
        self.pred_ratio, self.pred_ratio_var = check_mask_args(
            pred_ratio, pred_ratio_var, pred_shape, pred_aspect_ratio)
        self.grid_hw = None if grid_hw is None else (int(grid_hw[0]), int(grid_hw[1]))
        self.pred_aspect_ratio = tuple(float(a) for a in pred_aspect_ratio)
        self.log_aspect_ratio = (math.log(self.pred_aspect_ratio[0]),
                                 math.log(self.pred_aspect_ratio[1]))
        self.pred_shape = pred_shape

    def sample_ratio(self, rng) -> float:
        """Draw one crop's masking ratio (fraction in [0, 1]); see :func:`sample_pred_ratio`."""
        return sample_pred_ratio(rng, self.pred_ratio, self.pred_ratio_var)

    def __call__(self, rng, ratio: float = None, grid_hw: Sequence[int] = None) -> np.ndarray:
        """Return one bool mask ``(H, W)``; ``ratio=None`` draws it with :meth:`sample_ratio`."""
        hw = grid_hw if grid_hw is not None else self.grid_hw
        if hw is None:
            raise ValueError("MaskGenerator needs a grid size (grid_hw)")
        height, width = int(hw[0]), int(hw[1])
        if ratio is None:
            ratio = self.sample_ratio(rng)
        high = ratio * height * width
        if self.pred_shape == "block":
            return block_mask(rng, height, width, high, self.log_aspect_ratio)
        if self.pred_shape == "rand":
            return rand_mask(rng, height, width, high)
        raise ValueError(f"--pred_shape must be one of {list(PRED_SHAPES)}, got {self.pred_shape!r}")

    def __repr__(self) -> str:
        return (f"MaskGenerator(grid_hw={self.grid_hw}, pred_ratio={self.pred_ratio}, "
                f"pred_ratio_var={self.pred_ratio_var}, pred_aspect_ratio={self.pred_aspect_ratio}, "
                f"pred_shape={self.pred_shape!r})")
