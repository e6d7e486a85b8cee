"""Mask generation vs the official statistics (fixtures/official/mask_stats.json) and unit checks."""

import json
import math
import random

import numpy as np
import pytest

from ibot.data.masking import (MaskGenerator, block_mask, check_mask_args, normalize_ratio_args,
                          rand_mask, sample_pred_ratio)
from official_fixtures import fixture_path

MASK_STATS = json.loads(fixture_path("mask_stats.json").read_text())
# the 5 settings of the fixture, in file order
CASE_IDS = ["block-psz16-readme", "block-psz16-r0.3", "rand-psz16-r0.65|0.75", "block-psz4-32px",
            "block-psz32-swin-r0.4"]


def _draw(cfg, n, seed):
    """n masks per crop size of one fixture setting, with a seeded random.Random."""
    gen = MaskGenerator(None, cfg["pred_ratio"], cfg["pred_ratio_var"], pred_shape=cfg["shape"])
    rng = random.Random(seed)
    out = []
    for h, w in cfg["sizes"]:
        grid = (h // cfg["psz"], w // cfg["psz"])
        out.append(np.stack([gen(rng, grid_hw=grid) for _ in range(n)]))
    return out


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_matches_official_statistics(case):
    assert len(MASK_STATS) == len(CASE_IDS)
    setting = MASK_STATS[case]
    cfg = setting["config"]
    masks = _draw(cfg, 3000, seed=1234 + case)
    for m, ref in zip(masks, setting["crops"]):
        n, hh, ww = m.shape
        assert [hh, ww] == ref["grid"]
        counts = m.reshape(n, -1).sum(1)
        hist = np.bincount(counts, minlength=hh * ww + 1)
        ref_hist = np.asarray(ref["count_hist"], dtype=float)
        assert len(ref_hist) == hh * ww + 1
        ks = np.abs(np.cumsum(hist) / n - np.cumsum(ref_hist) / ref_hist.sum()).max()
        assert ks < 0.05, f"KS distance {ks:.4f}"
        assert abs(counts.mean() / (hh * ww) - ref["mean_fraction"]) < 0.01
        rows = m.any(axis=2).sum(1).mean()
        cols = m.any(axis=1).sum(1).mean()
        assert abs(rows - ref["mean_rows_touched"]) < 0.3
        assert abs(cols - ref["mean_cols_touched"]) < 0.3
        assert abs((counts == 0).mean() - ref["frac_empty"]) < 0.05


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.65, 0.75, 1.0])
def test_rand_exact_count(ratio):
    rng = random.Random(0)
    g = np.random.default_rng(0)
    for hw in [(14, 14), (7, 7), (6, 9)]:
        k = int(ratio * hw[0] * hw[1])
        for _ in range(20):
            assert rand_mask(rng, hw[0], hw[1], ratio * hw[0] * hw[1]).sum() == k
            m = rand_mask(g, hw[0], hw[1], ratio * hw[0] * hw[1])
            assert m.dtype == bool and m.shape == hw and m.sum() == k


def test_rand_is_uniform_over_cells():
    rng = random.Random(3)
    occ = np.mean([rand_mask(rng, 4, 4, 4.0) for _ in range(4000)], axis=0)
    assert np.allclose(occ, 0.25, atol=0.04)


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_zero_ratio_is_empty(shape):
    gen = MaskGenerator((14, 14), 0.0, 0.0, pred_shape=shape)
    rng = random.Random(0)
    for _ in range(50):
        m = gen(rng)
        assert m.shape == (14, 14) and m.dtype == bool and not m.any()


def test_block_total_at_most_floor_high_and_strict_bounds():
    rng = random.Random(5)
    la = (math.log(0.3), math.log(1 / 0.3))
    for hw in [(14, 14), (6, 6), (7, 7), (3, 3), (8, 5), (2, 2), (1, 1)]:
        for ratio in [0.05, 0.2, 0.37, 0.5, 0.9]:
            high = ratio * hw[0] * hw[1]
            for _ in range(30):
                m = block_mask(rng, hw[0], hw[1], high, la)
                assert m.sum() <= math.floor(high)
    # one rectangle only (first step) can never reach the full width/height: ratio small enough
    for _ in range(300):
        m = block_mask(rng, 14, 14, 0.1 * 196, la)
        assert m.any(0).sum() < 14 and m.any(1).sum() < 14


def test_numpy_generator_and_module_rng_supported():
    gen = MaskGenerator((14, 14), 0.3, 0.0)
    assert 0 < gen(np.random.default_rng(0)).sum() <= 58
    random.seed(0)
    a = gen(random)
    random.seed(0)
    assert np.array_equal(a, gen(random))


def test_generator_is_deterministic_given_rng():
    gen = MaskGenerator((14, 14), [0.0, 0.3], [0.0, 0.2])
    a = [gen(random.Random(7)) for _ in range(3)]
    b = [gen(random.Random(7)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_ratio_sampling_readme_setting():
    r, v = normalize_ratio_args([0.0, 0.3], [0.0, 0.2])
    rng = random.Random(0)
    vals = np.array([sample_pred_ratio(rng, r, v) for _ in range(4000)])
    zero = vals == 0
    assert abs(zero.mean() - 0.5) < 0.04
    assert vals[~zero].min() >= 0.1 and vals[~zero].max() <= 0.5
    assert abs(vals[~zero].mean() - 0.3) < 0.01
    # scalar with jitter, scalar without
    assert all(0.3 <= sample_pred_ratio(rng, 0.4, 0.1) <= 0.5 for _ in range(100))
    assert sample_pred_ratio(rng, 0.3, 0.0) == 0.3


def test_normalize_collapses_and_broadcasts():
    assert normalize_ratio_args([0.3], [0.0]) == (0.3, 0.0)
    assert normalize_ratio_args([0.1, 0.3], 0.05) == ((0.1, 0.3), (0.05, 0.05))
    assert normalize_ratio_args([0.1, 0.3], [0.05]) == ((0.1, 0.3), (0.05, 0.05))


def test_check_mask_args_errors():
    with pytest.raises(ValueError, match="--pred_shape"):
        check_mask_args(0.3, 0.0, "blocks")
    with pytest.raises(ValueError, match="--pred_shape"):
        MaskGenerator((14, 14), 0.3, 0.0, pred_shape="grid")
    with pytest.raises(ValueError, match="--pred_ratio_var"):
        check_mask_args([0.0, 0.3], [0.0, 0.4], "block")
    with pytest.raises(ValueError, match="--pred_ratio_var"):
        check_mask_args([0.1, 0.3, 0.5], [0.0, 0.1], "block")
    with pytest.raises(ValueError, match="--pred_ratio_var"):
        check_mask_args(0.3, [0.1, 0.1], "block")
    with pytest.raises(ValueError, match="--pred_ratio"):
        check_mask_args(0.9, 0.2, "rand")
    with pytest.raises(ValueError, match="--pred_ratio"):
        check_mask_args(-0.1, 0.0, "block")
    assert check_mask_args([0.0, 0.3], [0.0, 0.2], "block") == ((0.0, 0.3), (0.0, 0.2))
    assert check_mask_args([0.3], [0.0], "rand") == (0.3, 0.0)
