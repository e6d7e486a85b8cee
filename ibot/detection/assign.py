"""Target assignment of mmdet 2.x (``MaxIoUAssigner`` + ``RandomSampler``) on torchvision box ops.

Conventions: boxes are ``(x1, y1, x2, y2)`` in input pixels; ``assigned`` holds, per proposal, the
index of its ground-truth box (>= 0), ``NEGATIVE`` (background) or ``IGNORED`` (neither).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torchvision.ops import box_iou

__all__ = ["NEGATIVE", "IGNORED", "max_iou_assign", "sample_pos_neg", "inside_flags"]

NEGATIVE = -1
IGNORED = -2


def max_iou_assign(proposals: torch.Tensor, gt_boxes: torch.Tensor, pos_iou_thr: float, neg_iou_thr: float,
                   min_pos_iou: float, match_low_quality: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmdet's ``MaxIoUAssigner`` (``gt_max_assign_all=True``, no ignore boxes).

    A proposal whose best IoU is >= ``pos_iou_thr`` takes that ground truth; one whose best IoU is
    in ``[0, neg_iou_thr)`` is background; the others are ignored. With ``match_low_quality``, each
    ground truth (in order, a later one overwriting) whose best IoU is >= ``min_pos_iou`` also takes
    every proposal reaching that best IoU.

    Args:
        proposals: (N, 4); gt_boxes: (G, 4).
    Returns:
        (assigned (N,) int64, max_iou (N,) float) — ``max_iou`` is 0 where G == 0.
    """
    n = proposals.shape[0]
    if gt_boxes.numel() == 0:
        return (torch.full((n,), NEGATIVE, dtype=torch.int64, device=proposals.device),
                proposals.new_zeros(n))
    ious = box_iou(gt_boxes, proposals)                      # (G, N)
    max_iou, argmax = ious.max(dim=0)
    assigned = torch.full((n,), IGNORED, dtype=torch.int64, device=proposals.device)
    assigned[(max_iou >= 0) & (max_iou < neg_iou_thr)] = NEGATIVE
    positive = max_iou >= pos_iou_thr
    assigned[positive] = argmax[positive]
    if match_low_quality:
        gt_max = ious.max(dim=1).values
        for g in range(gt_boxes.shape[0]):
            if gt_max[g] >= min_pos_iou:
                assigned[ious[g] == gt_max[g]] = g
    return assigned, max_iou


def sample_pos_neg(assigned: torch.Tensor, num: int, pos_fraction: float,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmdet's ``RandomSampler`` (``neg_pos_ub=-1``): up to ``int(num * pos_fraction)`` positives
    drawn at random, then negatives to fill ``num``.

    Args:
        assigned: (N,) from :func:`max_iou_assign`.
    Returns:
        (pos_idx (P,), neg_idx (Q,)) int64 indices into the proposals, P + Q <= num.
    """
    pos = torch.nonzero(assigned >= 0).flatten()
    neg = torch.nonzero(assigned == NEGATIVE).flatten()
    num_pos = min(int(num * pos_fraction), pos.numel())
    pos = pos[torch.randperm(pos.numel(), generator=generator, device="cpu")[:num_pos].to(pos.device)]
    num_neg = min(num - num_pos, neg.numel())
    neg = neg[torch.randperm(neg.numel(), generator=generator, device="cpu")[:num_neg].to(neg.device)]
    return pos, neg


def inside_flags(anchors: torch.Tensor, height: int, width: int, allowed_border: float = 0) -> torch.Tensor:
    """mmdet's ``anchor_inside_flags``: anchors lying within the image by ``allowed_border`` px.

    Args:
        anchors: (N, 4); height, width: the unpadded input size. A negative ``allowed_border``
            keeps every anchor.
    Returns:
        (N,) bool.
    """
    if allowed_border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    return ((anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] < width + allowed_border) & (anchors[:, 3] < height + allowed_border))
