"""The official ``utils`` names owned by the retrieval / copy-detection code: ``accuracy``, ``PCA``,
``compute_ap``, ``compute_map`` (re-exported by the top-level ``utils``), against hand-computed values."""
import numpy as np
import pytest
import torch

import utils
from ibot.eval.finetune import accuracy, topk_accuracy
from ibot.eval.retrieval_metrics import PCA, compute_ap, compute_map


def test_top_level_utils_re_exports_the_package_implementations():
    assert utils.accuracy is accuracy
    assert utils.PCA is PCA and utils.compute_ap is compute_ap and utils.compute_map is compute_map


def test_accuracy_percent_tensors_and_topk_floats():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 1, 0])
    top1, top2 = accuracy(out, target, topk=(1, 2))
    assert torch.is_tensor(top1) and top1.ndim == 0
    assert top1.item() == pytest.approx(100 / 3)        # only sample 0
    assert top2.item() == pytest.approx(200 / 3)        # samples 0 and 1 (0 is third for sample 2)
    assert topk_accuracy(out, target, topk=(1, 5)) == pytest.approx([100 / 3, 100.0])  # k > C: top C


def test_compute_ap_trapezoids():
    # positives at ranks 0 and 2 of 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 19/24
    assert compute_ap([0, 2], 2) == pytest.approx(19 / 24)
    # one of three positives retrieved, at rank 1: (0 + 1/2)/2 * 1/3
    assert compute_ap([1], 3) == pytest.approx(1 / 12)
    assert compute_ap([], 4) == 0.0
    with pytest.raises(ValueError):
        compute_ap([0], 0)


def test_compute_map_junk_and_empty_queries():
    # query 0: ok {1, 3}, junk {2}; ranking 2 1 5 3 0 4 6 7 -> positives at 1 and 3, minus one junk
    # before each -> 0 and 2: AP 19/24; P@1 = 1, P@5 = P@10 = 2/3 (kq = min(last positive 3, k))
    # query 1: no positive -> skipped; query 2: ok {0} ranked first -> AP 1, P@k = 1
    ranks = np.array([[2, 1, 5, 3, 0, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7], [0, 5, 6, 7, 1, 2, 3, 4]]).T
    gnd = [{"ok": [1, 3], "junk": [2]}, {"ok": [], "junk": [0]}, {"ok": [0]}]
    m, aps, pr, prs = compute_map(ranks, gnd, [1, 5, 10])
    assert m == pytest.approx((19 / 24 + 1) / 2)
    assert aps[0] == pytest.approx(19 / 24) and np.isnan(aps[1]) and aps[2] == pytest.approx(1.0)
    np.testing.assert_allclose(prs[0], [1, 2 / 3, 2 / 3])
    np.testing.assert_allclose(pr, [1, 5 / 6, 5 / 6])
    # the official 4-tuple also without kappas; no query with positives -> NaN instead of a crash
    assert len(compute_map(ranks, gnd)) == 4
    assert np.isnan(compute_map(ranks[:, 1:2], gnd[1:2])[0])


def test_pca_whitening_floor_and_order():
    pca = PCA(dim=2, whit=0.5)
    kept = pca.train_pca(np.diag([1.0, 4.0]))
    assert kept == pytest.approx(1.0)
    x = np.array([[3.0, 2.0]])
    y = pca.apply(x)
    np.testing.assert_allclose(np.abs(y), [[1.0, 3.0]])      # leading component (eigenvalue 4) first, / 2
    yt = pca.apply(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-6)
    assert x.tolist() == [[3.0, 2.0]]                        # input left untouched
    one = PCA(dim=1, whit=0.5)
    assert one.train_pca(np.diag([1.0, 4.0])) == pytest.approx(0.8)
    floored = PCA(dim=2, whit=0.5)
    floored.train_pca(np.diag([1.0, 1e-9]))                  # 1e-9 < 1e-5 * max -> floored to 1e-5
    np.testing.assert_allclose(np.abs(floored.apply(np.array([[0.0, 1.0]]))), [[0.0, 1e5 ** 0.5]], rtol=1e-6)
    floored.mean = np.array([0.0, 1.0])
    np.testing.assert_allclose(floored.apply(np.array([[0.0, 1.0]])), [[0.0, 0.0]], atol=1e-12)
