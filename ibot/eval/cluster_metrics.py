"""Clustering metrics of the official unsupervised-classification evaluation (evaluation.md §2.8).

``eval_pred(label, pred, calc_acc)`` returns ``(nmi, ari, fscore, acc)``:

* NMI: ``sklearn.metrics.normalized_mutual_info_score`` (arithmetic normalisation, the default);
* ARI: ``sklearn.metrics.adjusted_rand_score``;
* F: the Fowlkes-Mallows index, ``sklearn.metrics.fowlkes_mallows_score``;
* ACC: Hungarian-matched accuracy (one-to-one assignment of predicted clusters to true labels that
  maximises the number of correctly labelled samples), or ``-1`` when ``calc_acc`` is false.

The official code solves the assignment with ``munkres`` on the cost ``|cluster p| - C[t, p]``; here
``scipy.optimize.linear_sum_assignment`` maximises the contingency counts directly, which yields the
same optimum (the accuracy is the optimal value, so ties between assignments do not matter). Unlike
the official code, cluster and label ids need not be ``0..K-1`` and the numbers of clusters and of
labels may differ (samples in unmatched clusters count as errors).
"""
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics

__all__ = ["eval_pred", "hungarian_accuracy"]


def _as_1d_int(x, name):
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def hungarian_accuracy(label, pred):
    """Best one-to-one matching accuracy between predicted clusters and true labels.

    Args:
        label: (N,) true class ids (any hashable integers).
        pred: (N,) predicted cluster ids (any integers).
    Returns:
        float in [0, 1]: max over injective maps cluster->label of the fraction of samples whose
        mapped cluster equals their label.
    """
    label = _as_1d_int(label, "label")
    pred = _as_1d_int(pred, "pred")
    if label.shape != pred.shape:
        raise ValueError(f"label and pred differ in length: {label.shape} vs {pred.shape}")
    if label.size == 0:
        raise ValueError("eval_pred needs at least one sample")
    _, li = np.unique(label, return_inverse=True)
    _, pi = np.unique(pred, return_inverse=True)
    counts = np.zeros((pi.max() + 1, li.max() + 1), dtype=np.int64)  # counts[cluster, label]
    np.add.at(counts, (pi, li), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / label.size


def eval_pred(label, pred, calc_acc=False):
    """NMI, ARI, Fowlkes-Mallows F and (optionally) Hungarian accuracy of a clustering.

    Args:
        label: (N,) int array/list/tensor of true classes.
        pred: (N,) int array/list/tensor of predicted clusters (e.g. argmax of head logits).
        calc_acc: also compute the Hungarian-matched accuracy (else it is returned as -1).
    Returns:
        (nmi, ari, fscore, acc): floats in [0, 1] (ARI may be negative); ``acc == -1`` when
        ``calc_acc`` is false.
    """
    label = _as_1d_int(label, "label")
    pred = _as_1d_int(pred, "pred")
    if label.shape != pred.shape:
        raise ValueError(f"label and pred differ in length: {label.shape} vs {pred.shape}")
    nmi = float(metrics.normalized_mutual_info_score(label, pred))
    ari = float(metrics.adjusted_rand_score(label, pred))
    f = float(metrics.fowlkes_mallows_score(label, pred))
    if not calc_acc:
        return nmi, ari, f, -1
    return nmi, ari, f, hungarian_accuracy(label, pred)
