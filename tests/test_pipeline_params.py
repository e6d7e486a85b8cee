"""Random parameters of the fast and device pipelines (issue 17): the official draws, sample by sample,
and the official distributions (KS distance, Bernoulli rates, the 24 jitter orders)."""
import itertools
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from scipy import stats
from torchvision.transforms import functional as TF

import ibot.data.augment as augment_mod
from ibot.data.augment import DataAugmentationiBOT
from ibot.data.device_augment import PARAM_FIELDS
from ibot.data.fast_augment import DeviceMultiCrop, FastMultiCrop

COL = {n: i for i, n in enumerate(PARAM_FIELDS)}
OPS = ("brightness", "contrast", "saturation", "hue")


def _photo(w=120, h=90, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def recorder(monkeypatch):
    """Record, crop by crop, every parameter the official PIL path applies."""
    crops = []

    def wrap(name, fn, key):
        def recorded(img, *a, **k):
            event = key(*a, **k)
            if name == "crop":
                crops.append({"box": event})
            else:
                crops[-1][name] = event
                if name in OPS:
                    crops[-1].setdefault("order", []).append(OPS.index(name))
            return fn(img, *a, **k)
        return recorded

    monkeypatch.setattr(TF, "resized_crop", wrap("crop", TF.resized_crop, lambda i, j, h, w, *a, **k: (i, j, h, w)))
    monkeypatch.setattr(TF, "hflip", wrap("flip", TF.hflip, lambda *a, **k: True))
    for name in OPS:
        fn = getattr(TF, f"adjust_{name}")
        monkeypatch.setattr(TF, f"adjust_{name}", wrap(name, fn, lambda f, *a, **k: float(f)))
    monkeypatch.setattr(TF, "rgb_to_grayscale", wrap("grayscale", TF.rgb_to_grayscale, lambda *a, **k: True))

    class Filters:  # ibot.data.augment.GaussianBlur calls ImageFilter.GaussianBlur(radius=...)
        @staticmethod
        def GaussianBlur(radius):
            crops[-1]["blur"] = float(radius)
            return ImageFilter.GaussianBlur(radius=radius)

    monkeypatch.setattr(augment_mod, "ImageFilter", Filters)
    solarize = ImageOps.solarize

    def solarize_recorded(img, *a, **k):
        crops[-1]["solarize"] = True
        return solarize(img, *a, **k)

    monkeypatch.setattr(augment_mod.ImageOps, "solarize", solarize_recorded)
    return crops


def _as_events(draw):
    """Our draw of one crop in the recorder's format."""
    p = draw.params
    event = {"box": tuple(draw.box)}
    if draw.flip:
        event["flip"] = True
    if p[COL["jitter"]]:
        order = [int(p[COL[f"order_{k}"]]) for k in range(4)]
        event["order"] = order
        for k in order:
            event[OPS[k]] = float(p[COL[OPS[k]]])
    if p[COL["grayscale"]]:
        event["grayscale"] = True
    if p[COL["blur_sigma"]] > 0:
        event["blur"] = float(p[COL["blur_sigma"]])
    if p[COL["solarize"]]:
        event["solarize"] = True
    return event


@pytest.mark.parametrize("path, scales", [(FastMultiCrop, (1.0, 1.0)), (DeviceMultiCrop, (1.0, 1.0)),
                                          (DeviceMultiCrop, (2.0, 0.5))])
def test_draws_equal_the_official_draws(recorder, path, scales):
    """Under the same RNG state, every crop gets the very parameters of the official PIL path (also with
    --color_jitter_scale 2 and --blur_radius_scale 0.5)."""
    kw = dict(global_crops_size=32, local_crops_size=16, color_jitter_scale=scales[0], blur_radius_scale=scales[1])
    official = DataAugmentationiBOT((0.25, 1.0), (0.05, 0.25), 3, 4, **kw)
    ours = path((0.25, 1.0), (0.05, 0.25), 3, 4, **kw)
    n_checked = 0
    for seed in range(40):
        img = _photo(seed=seed)
        torch.manual_seed(seed)
        random.seed(seed)
        recorder.clear()
        official(img)
        after = (torch.get_rng_state(), random.getstate())
        torch.manual_seed(seed)
        random.seed(seed)
        draws = ours.draw(TF.pil_to_tensor(img))
        assert [_as_events(d) for d in draws] == recorder
        # the draws consume both RNGs exactly as the official transform does
        assert torch.equal(torch.get_rng_state(), after[0]) and random.getstate() == after[1]
        n_checked += len(draws)
    assert n_checked == 40 * 7


def _draw_many(n_images, ng, nl, seed=0):
    """Parameter rows of n_images images (all crops), drawn like a seeded data set does."""
    t = DeviceMultiCrop((0.25, 1.0), (0.05, 0.25), ng, nl)
    image = torch.empty(3, 375, 500, dtype=torch.uint8)  # only the size matters for the draws
    torch.manual_seed(seed)
    random.seed(seed)
    draws = [t.draw(image) for _ in range(n_images)]
    boxes = np.array([[d.box for d in row] for row in draws], dtype=np.float64)     # (n, crops, 4)
    params = np.array([[d.params for d in row] for row in draws])                   # (n, crops, P)
    flips = np.array([[d.flip for d in row] for row in draws])
    return boxes, params, flips


def _official_crop_reference(n, scale, h_img=375, w_img=500, seed=1):
    """Area fraction and log aspect ratio of RandomResizedCrop, simulated from its definition
    (10 tries of area ~ U(scale) x HW, log ratio ~ U(log 3/4, log 4/3), round, accept if it fits;
    then the central fallback), vectorised in NumPy."""
    rng = np.random.default_rng(seed)
    area = h_img * w_img
    out_h, out_w = np.zeros(n), np.zeros(n)
    todo = np.ones(n, bool)
    for _ in range(10):
        a = rng.uniform(*scale, n) * area
        r = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))
        w = np.round(np.sqrt(a * r))
        h = np.round(np.sqrt(a / r))
        ok = todo & (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
        out_h[ok], out_w[ok] = h[ok], w[ok]
        todo &= ~ok
    ratio_img = w_img / h_img  # fallback: the whole image clipped to the ratio range (inside it here)
    out_h[todo], out_w[todo] = h_img, w_img
    assert 3 / 4 <= ratio_img <= 4 / 3
    return out_h * out_w / area, np.log(out_w / out_h)


@pytest.mark.slow
def test_parameter_distributions_are_official():
    ng, nl, n = 5, 10, 2400          # 2400 first globals, 9600 other globals, 24000 locals
    boxes, params, flips = _draw_many(n, ng, nl)
    groups = {"global1": slice(0, 1), "global2": slice(1, ng), "local": slice(ng, ng + nl)}
    pooled = params.reshape(-1, params.shape[-1])

    # continuous parameters: KS distance to the official distributions below 0.02
    jit = pooled[pooled[:, COL["jitter"]] == 1]
    for name, (lo, hi) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2),
                           "hue": (-0.1, 0.1)}.items():
        d = stats.kstest(jit[:, COL[name]], stats.uniform(lo, hi - lo).cdf).statistic
        assert d < 0.02, (name, d)
    sig = pooled[:, COL["blur_sigma"]]
    d = stats.kstest(sig[sig > 0], stats.uniform(0.1, 1.9).cdf).statistic
    assert d < 0.02, ("blur radius", d)
    for group, scale in (("global2", (0.25, 1.0)), ("local", (0.05, 0.25))):
        b = boxes[:, groups[group]].reshape(-1, 4)
        ours_area, ours_logr = b[:, 2] * b[:, 3] / (375 * 500), np.log(b[:, 3] / b[:, 2])
        ref_area, ref_logr = _official_crop_reference(200_000, scale)
        for what, x, y in (("area", ours_area, ref_area), ("log ratio", ours_logr, ref_logr)):
            d = stats.ks_2samp(x, y).statistic
            assert d < 0.02, (group, what, d)

    # Bernoulli parameters: rates within 1 % (absolute) of the official probabilities
    def rate(values):
        return float(np.mean(values))

    assert abs(rate(flips) - 0.5) < 0.01
    assert abs(rate(pooled[:, COL["jitter"]]) - 0.8) < 0.01
    assert abs(rate(pooled[:, COL["grayscale"]]) - 0.2) < 0.01
    for group, p_blur, p_sol in (("global1", 1.0, 0.0), ("global2", 0.1, 0.2), ("local", 0.5, 0.0)):
        g = params[:, groups[group]].reshape(-1, params.shape[-1])
        assert abs(rate(g[:, COL["blur_sigma"]] > 0) - p_blur) < 0.01, group
        assert abs(rate(g[:, COL["solarize"]]) - p_sol) < 0.01, group

    # the jitter order: uniform over the 24 permutations (chi-square), each within 1 % of 1/24
    orders = [tuple(int(v) for v in row) for row in jit[:, COL["order_0"]:COL["order_3"] + 1]]
    counts = np.array([orders.count(p) for p in itertools.permutations(range(4))])
    assert counts.sum() == len(orders)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert np.abs(counts / counts.sum() - 1 / 24).max() < 0.01


def test_distribution_checks_detect_small_deviations():
    """Negative controls: the thresholds above reject a brightness range 10 % too wide and a
    grayscale probability of 0.22, with the same number of samples."""
    _, params, _ = _draw_many(800, 5, 10, seed=3)
    pooled = params.reshape(-1, params.shape[-1])
    jit = pooled[pooled[:, COL["jitter"]] == 1]
    assert stats.kstest(jit[:, COL["brightness"]], stats.uniform(0.6, 0.8).cdf).statistic < 0.02
    assert stats.kstest(jit[:, COL["brightness"]], stats.uniform(0.56, 0.88).cdf).statistic >= 0.02
    g = pooled[:, COL["grayscale"]].mean()
    assert abs(g - 0.2) < 0.01 and abs(g - 0.22) >= 0.01
