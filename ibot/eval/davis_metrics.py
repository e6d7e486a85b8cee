"""J&F of DAVIS 2017 semi-supervised results, computed in the project with the DAVIS definitions
(Perazzi et al. 2016; Pont-Tuset et al. 2017; the davis2017-evaluation tool).

* Region similarity J: Jaccard index |S ∩ G| / |S ∪ G| per object and frame (1 when both are empty;
  void pixels (255) count as background, as in the tool's semi-supervised evaluation, which passes no
  void mask; ``use_void=True`` excludes them).
* Boundary accuracy F: boundaries are the pixels whose east, south or south-east neighbour differs;
  a boundary pixel matches if the other boundary lies within a disk of radius
  ``ceil(0.008 · image diagonal)`` pixels; F = 2PR / (P + R) with the DAVIS conventions for empty
  boundaries.
* Per object: Mean (nan-mean over frames), Recall (share of frames > 0.5), Decay (mean of the first
  minus the last of 4 temporal bins). The first and the last frame of every sequence are excluded.
* Global: the means over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2.
"""
import math
import os
import warnings

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

__all__ = ["BOUND_TH", "jaccard", "seg2bmap", "disk", "f_measure", "boundary_f", "db_statistics",
           "read_masks", "evaluate_sequence", "evaluate_davis"]

BOUND_TH = 0.008


def jaccard(annotation, segmentation, void=None):
    """Region similarity of (..., H, W) boolean masks; returns an array over the leading dims (or a float)."""
    a, s = np.asarray(annotation, bool), np.asarray(segmentation, bool)
    keep = ~np.asarray(void, bool) if void is not None else np.ones_like(a)
    inter = np.sum(a & s & keep, axis=(-2, -1))
    union = np.sum((a | s) & keep, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inter / union
    j = np.where(np.isclose(union, 0), 1.0, j)
    return float(j) if np.ndim(j) == 0 else j


def seg2bmap(seg):
    """Boundary map of a (H, W) mask: pixel differs from its east, south or south-east neighbour
    (last row: east only; last column: south only; bottom-right corner: 0). Returns bool (H, W)."""
    seg = np.asarray(seg).astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius):
    """(2r+1, 2r+1) bool structuring element x² + y² ≤ r² (scikit-image's ``disk``)."""
    r = int(radius)
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= r * r


def f_measure(segmentation, annotation, void=None, bound_th=BOUND_TH):
    """Boundary F-measure of one frame ((H, W) masks). Returns a float in [0, 1]."""
    seg, gt = np.asarray(segmentation, bool), np.asarray(annotation, bool)
    keep = ~np.asarray(void, bool) if void is not None else np.ones_like(seg)
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(seg.shape))
    fg_b, gt_b = seg2bmap(seg & keep), seg2bmap(gt & keep)
    se = disk(bound_pix)
    fg_dil = binary_dilation(fg_b, structure=se) if fg_b.any() else fg_b
    gt_dil = binary_dilation(gt_b, structure=se) if gt_b.any() else gt_b
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float((fg_b & gt_dil).sum()) / n_fg
        recall = float((gt_b & fg_dil).sum()) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def boundary_f(annotation, segmentation, void=None, bound_th=BOUND_TH):
    """F-measure per frame of (T, H, W) masks: (T,) float array."""
    return np.array([f_measure(segmentation[t], annotation[t], None if void is None else void[t], bound_th)
                     for t in range(len(annotation))])


def db_statistics(values):
    """``(mean, recall, decay)`` of per-frame values (T,): nan-mean, share > 0.5, first − last of 4 bins."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(x)) if x.size else float("nan")
    recall = float(np.nanmean(x > 0.5)) if x.size else float("nan")
    ids = (np.round(np.linspace(1, len(x), 5) + 1e-10) - 1).astype(np.int64)
    bins = [x[ids[i]:ids[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():     # an all-NaN bin gives NaN, as in the DAVIS tool
        warnings.simplefilter("ignore", RuntimeWarning)
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def read_masks(paths, n_objects=None):
    """Stack indexed PNGs into per-object masks.

    Returns ``(masks (K, T, H, W) bool, void (T, H, W) bool)``; K = ``n_objects`` or the largest
    label found (255 = void, never an object).
    """
    frames = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"mask not found: {p}")
        with Image.open(p) as im:
            frames.append(np.array(im))
    stack = np.stack(frames)
    void = stack == 255
    stack = np.where(void, 0, stack)
    k = int(stack.max()) if n_objects is None else n_objects
    ids = np.arange(1, k + 1).reshape(-1, 1, 1, 1)
    return stack[None] == ids, void


def evaluate_sequence(gt_paths, res_paths, bound_th=BOUND_TH, use_void=False):
    """J and F per object of one sequence, first and last frames excluded (semi-supervised protocol).

    Objects: the labels of the first ground-truth frame (1..K). Results (read for the scored frames
    only) with more objects are an error; missing objects count as empty masks. ``use_void``: exclude
    the void pixels (255) of the annotations; False as in the DAVIS tool's semi-supervised evaluation,
    which passes no void mask (void pixels then count as background). Returns ``(J, F)``, (K, T-2) each.
    """
    if len(gt_paths) != len(res_paths):
        raise ValueError(f"{len(res_paths)} result masks for {len(gt_paths)} annotated frames")
    with Image.open(gt_paths[0]) as im:
        first = np.array(im)
    n_obj = int(np.where(first == 255, 0, first).max())
    gt, void = read_masks(gt_paths, n_obj)
    gt, void = gt[:, 1:-1], (void[1:-1] if use_void else None)
    res, _ = read_masks(res_paths[1:-1]) if len(res_paths) > 2 else (np.zeros((0,) + gt.shape[1:], bool), None)
    if res.shape[0] > n_obj:
        raise ValueError(f"results {os.path.dirname(res_paths[0])} have {res.shape[0]} objects, the "
                         f"ground truth {n_obj}")
    if res.shape[0] < n_obj:
        res = np.concatenate([res, np.zeros((n_obj - res.shape[0],) + gt.shape[1:], bool)])
    if res.shape[2:] != gt.shape[2:]:
        raise ValueError(f"result masks are {res.shape[2:]}, annotations {gt.shape[2:]}")
    j = np.stack([jaccard(gt[i], res[i], void) for i in range(n_obj)]) if n_obj else np.zeros((0, gt.shape[1]))
    f = np.stack([boundary_f(gt[i], res[i], void, bound_th) for i in range(n_obj)]) if n_obj \
        else np.zeros((0, gt.shape[1]))
    return j, f


def evaluate_davis(davis_root, results_dir, videos, resolution="480p", bound_th=BOUND_TH):
    """J&F of ``results_dir/<video>/<frame>.png`` against ``davis_root/Annotations/<resolution>/<video>/``.

    Returns a dict: ``J&F-Mean``, ``J-Mean``, ``J-Recall``, ``J-Decay``, ``F-Mean``, ``F-Recall``,
    ``F-Decay`` (fractions in [0, 1], averaged over all objects) and ``per_object``
    ``{"<video>_<k>": {"J-Mean": .., "F-Mean": ..}}``.
    """
    stats, per_object = {k: [] for k in ("JM", "JR", "JD", "FM", "FR", "FD")}, {}
    for video in videos:
        gt_dir = os.path.join(davis_root, "Annotations", resolution, video)
        if not os.path.isdir(gt_dir):
            raise FileNotFoundError(f"annotation folder not found: {gt_dir}")
        names = sorted(f for f in os.listdir(gt_dir) if f.endswith(".png"))
        j, f = evaluate_sequence([os.path.join(gt_dir, n) for n in names],
                                 [os.path.join(results_dir, video, n) for n in names], bound_th)
        for k in range(j.shape[0]):
            jm, jr, jd = db_statistics(j[k])
            fm, fr, fd = db_statistics(f[k])
            for key, v in zip(("JM", "JR", "JD", "FM", "FR", "FD"), (jm, jr, jd, fm, fr, fd)):
                stats[key].append(v)
            per_object[f"{video}_{k + 1}"] = {"J-Mean": jm, "F-Mean": fm}
    if not stats["JM"]:
        raise ValueError("no object to evaluate (empty first-frame annotations?)")
    out = {name: float(np.mean(stats[key])) for name, key in
           (("J-Mean", "JM"), ("J-Recall", "JR"), ("J-Decay", "JD"), ("F-Mean", "FM"), ("F-Recall", "FR"),
            ("F-Decay", "FD"))}
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    out["per_object"] = per_object
    return out
