"""Ranking metrics and PCA-whitening with the official ``utils`` semantics (evaluation.md §2.9-2.10).

* :func:`compute_ap` — average precision of one ranking by the trapezoid rule over the
  precision-recall curve (the Oxford/Paris and INRIA Holidays formula). Copy detection uses it too:
  its "Holidays" AP is the same formula.
* :func:`compute_map` — the revisited Oxford/Paris protocol: junk images are taken out of the
  ranking (the ranks of the positives behind them move up), queries without positives are skipped,
  and mP@k divides by ``min(k, rank of the last positive)`` (official: ``kq = min(max(pos), k)``).
* :class:`PCA` — eigen-decomposition of a (second-moment) matrix, eigenvalues floored at
  ``max · 1e-5``, projection ``diag(d^-whit) · Vᵀ`` on the ``dim`` leading components.
"""
import numpy as np
import torch

__all__ = ["compute_ap", "compute_map", "PCA"]


def compute_ap(ranks, nres):
    """Average precision of one query.

    Args:
        ranks: 0-based positions of the retrieved positives in the ranking, ascending (junk already
            removed); positives that were not retrieved are simply absent.
        nres: total number of positives of the query (> 0).
    Returns:
        float AP in [0, 1]: Σ_j (P_left_j + P_right_j)/2 · (1/nres), with P_left = j/rank (1 at rank 0)
        and P_right = (j+1)/(rank+1) for the j-th retrieved positive.
    """
    if nres <= 0:
        raise ValueError(f"compute_ap: nres must be > 0, got {nres}")
    recall_step = 1.0 / nres
    ap = 0.0
    for j, rank in enumerate(np.asarray(ranks).reshape(-1).tolist()):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def compute_map(ranks, gnd, kappas=()):
    """Mean average precision and mean precision at ``kappas`` (revisited protocol).

    Args:
        ranks: (n_db, n_queries) int array; column i lists database indices for query i, best first
            (it may be truncated to fewer than n_db rows).
        gnd: list of n_queries dicts with ``ok`` (positive database indices) and optionally ``junk``.
        kappas: the k of mP@k (e.g. ``[1, 5, 10]``).
    Returns:
        ``(map, aps, pr, prs)``: mAP (float), per-query AP (n_queries,) with NaN for queries without
        positives, mean precision at each kappa (len(kappas),), and per-query precisions
        (n_queries, len(kappas)). Values are fractions in [0, 1]. As officially, the 4-tuple is
        returned even when ``kappas`` is empty. If no query has a positive, mAP and pr are NaN.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"compute_map: ranks must be (n_db, n_queries={len(gnd)}), got shape {ranks.shape}")
    kappas = list(kappas)
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total_ap, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"]).reshape(-1)
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i].get("junk", [])).reshape(-1)
        pos = np.flatnonzero(np.isin(ranks[:, i], qgnd))
        junk = np.flatnonzero(np.isin(ranks[:, i], qgndj))
        # each positive moves up by the number of junk images ranked before it
        pos = pos - np.searchsorted(junk, pos)
        ap = compute_ap(pos, len(qgnd))
        total_ap += ap
        aps[i] = ap
        if len(pos) == 0:
            prs[i, :] = 0.0    # the official code would fail on max() of an empty array
        else:
            pos1 = pos + 1     # 1-based
            for j, k in enumerate(kappas):
                kq = min(int(pos1.max()), k)
                prs[i, j] = (pos1 <= kq).sum() / kq
        pr = pr + prs[i, :]
    n_valid = nq - nempty
    if n_valid == 0:
        return float("nan"), aps, np.full(len(kappas), float("nan")), prs
    return total_ap / n_valid, aps, pr / n_valid, prs


class PCA:
    """PCA / whitening learnt from a covariance (or second-moment) matrix, official ``utils.PCA``.

    ``train_pca(cov)`` with ``cov`` (D, D) numpy; ``apply(x)`` maps (N, D) numpy or torch rows to
    (N, dim) rows ``(x - mean) · (diag(d^-whit) Vᵀ)ᵀ`` (``mean`` is None unless the caller sets it).
    Unlike the official ``apply``, the input is not modified in place.
    """

    def __init__(self, dim=256, whit=0.5):
        self.dim = dim
        self.whit = whit
        self.mean = None
        self.dvt = None

    def train_pca(self, cov):
        """Eigen-decompose ``cov`` (D, D); eigenvalues below ``max·1e-5`` are floored to that value.

        Returns the share of the energy kept by the ``dim`` leading components (fraction; also printed in %).
        """
        d, v = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
        eps = d.max() * 1e-5
        d = np.where(d < eps, eps, d)
        total_energy = d.sum()
        idx = np.argsort(d)[::-1][:self.dim]
        d, v = d[idx], v[:, idx]
        kept = d.sum() / total_energy
        print("keeping %.2f %% of the energy" % (kept * 100.0))
        self.dvt = np.dot(np.diag(1.0 / d ** self.whit), v.T)
        return float(kept)

    def apply(self, x):
        """Project rows of ``x`` (N, D) numpy array or torch tensor; returns the same kind, (N, dim)."""
        if self.dvt is None:
            raise RuntimeError("PCA.apply called before train_pca")
        if isinstance(x, np.ndarray):
            if self.mean is not None:
                x = x - self.mean
            return np.dot(self.dvt, x.T).T
        dvt = torch.as_tensor(self.dvt, dtype=torch.float32, device=x.device)
        x = x.float()
        if self.mean is not None:
            x = x - torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
        return torch.mm(dvt, x.t()).t()
