"""mIoU as mmseg 0.12 accumulates it (``mmseg/core/evaluation/metrics.py``).

For every image, pixels whose ground truth is the ignore index are dropped; per class c the areas
``intersect_c = #(pred == gt == c)``, ``pred_c = #(pred == c)``, ``label_c = #(gt == c)`` are
counted and SUMMED over the whole set (not averaged per image). Then ``IoU_c = I_c / (P_c + L_c - I_c)``
and ``Acc_c = I_c / L_c``; a class absent from both predictions and ground truth has 0/0 = NaN and
is left out of ``mIoU = nanmean(IoU)``; ``aAcc = sum I / sum L``. With several processes each rank
accumulates its images and the four vectors are summed across ranks before the division.
"""
import numpy as np
import torch

from ibot.utils.distributed import all_reduce_sum

from .transforms import IGNORE_INDEX

__all__ = ["intersect_and_union", "IoUAccumulator", "summarize"]


def intersect_and_union(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """Per-class areas of one image: ``(intersect, union, pred_area, label_area)``, int64 ``(C,)`` each.

    ``pred`` and ``label``: integer tensors of the same shape (label may hold ``ignore_index``).
    """
    pred, label = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(label).reshape(-1).long()
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, label {label.numel()}")
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values outside 0..{num_classes - 1} (and {ignore_index})")
    inter = torch.bincount(label[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return inter, area_pred + area_label - inter, area_pred, area_label


class IoUAccumulator:
    """Sums the per-class areas over images (and ranks); :meth:`summary` gives the metrics."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64)

    def update(self, pred, label):
        """Add one image (``pred``, ``label`` integer maps of the same size)."""
        inter, union, area_pred, area_label = intersect_and_union(pred.cpu(), label.cpu(), self.num_classes)
        self.areas += torch.stack([inter, union, area_pred, area_label]).double()

    def all_reduce(self, device="cpu"):
        """Sum the areas of every rank (no-op on one process); returns self."""
        areas = self.areas.to(device)
        all_reduce_sum(areas)
        self.areas = areas.cpu()
        return self

    def summary(self, class_names=None):
        """``{'mIoU', 'mAcc', 'aAcc'}`` in percent, plus per-class ``IoU`` / ``Acc`` lists (NaN = absent)."""
        return summarize(*self.areas, class_names=class_names)


def summarize(intersect, union, area_pred, area_label, class_names=None):
    """Metrics from summed areas (see the module docstring); percentages, NaN for undefined classes."""
    inter, union, label = (np.asarray(t, dtype=np.float64) for t in (intersect, union, area_label))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label
    out = {"mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
           "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
           "aAcc": float(inter.sum() / label.sum() * 100) if label.sum() else float("nan"),
           "IoU": [float(v * 100) for v in iou], "Acc": [float(v * 100) for v in acc]}
    if class_names is not None:
        out["classes"] = list(class_names)
    return out
