import json

import numpy as np
import pytest

from ibot.eval.cluster_metrics import eval_pred, hungarian_accuracy
from official_fixtures import FIXTURES

FIX = str(FIXTURES / "clustering.json")


def test_eval_pred_matches_official():
    d = json.load(open(FIX))
    nmi, ari, f, acc = eval_pred(np.array(d["label"]), np.array(d["pred"]), calc_acc=True)
    assert abs(nmi - d["nmi"]) < 1e-9
    assert abs(ari - d["ari"]) < 1e-9
    assert abs(f - d["fscore"]) < 1e-9
    assert abs(acc - d["acc"]) < 1e-9
    assert eval_pred(d["label"], d["pred"])[3] == -1


def test_hungarian_permutation_invariance_and_rectangular():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    perm = rng.permutation(5) + 10  # ids need not start at 0
    assert hungarian_accuracy(y, perm[y]) == 1.0
    # more clusters than labels: the extra cluster's samples count as errors
    p = y.copy()
    p[:10] = 99
    assert hungarian_accuracy(y, p) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        eval_pred([0, 1], [0])
