"""Cascade R-CNN RoI heads with masks, as mmdet 2.x ``CascadeRoIHead`` runs them.

Training, stage ``i`` (IoU threshold ``t_i``, loss weight ``w_i``, target stds ``s_i``):

1. the ground-truth boxes are put in front of the proposals (``add_gt_as_proposals``);
2. ``MaxIoUAssigner(pos = neg = min_pos = t_i)``; ``RandomSampler(num, pos_fraction)``;
3. classification: softmax cross-entropy over ``C + 1`` classes (background = ``C``), averaged over
   all sampled RoIs; regression: the deltas of the RoI's own class (class-specific) are decoded with
   the stds ``s_i`` and compared to the ground-truth box with the GIoU loss, summed over positives
   and divided by the number of sampled RoIs (mmdet's ``avg_factor``), times ``giou_weight`` (10);
4. masks: the stage's own FCN mask head on the positive RoIs, binary cross-entropy against the
   ground-truth mask cropped to the RoI (RoIAlign aligned, 28 px, binarised at 0.5);
5. every stage's losses are multiplied by ``w_i``;
6. the sampled RoIs, without the ground-truth boxes sampled as positives, are regressed by their
   class (the assigned one, or the predicted foreground argmax for negatives), clipped to the image,
   and become the proposals of stage ``i + 1`` (no gradient).

Test: every stage scores and refines the previous stage's boxes (argmax over foreground classes);
the class logits of all stages are averaged, soft-maxed, the last stage's class-specific boxes are
decoded, then score > ``score_thr``, per-class NMS (``nms_iou``) and the ``max_dets`` best are kept.
Mask probabilities are the mean of all stages' mask heads on those boxes.

``num_stages=1`` gives a plain Mask R-CNN head (stage-1 settings).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image, generalized_box_iou_loss, roi_align

from ibot.detection.assign import max_iou_assign, sample_pos_neg
from ibot.detection.heads import AlignedMultiScaleRoIAlign, ConvFCBBoxHead, FCNMaskHead

__all__ = ["OFFICIAL_STAGE_IOUS", "OFFICIAL_STAGE_WEIGHTS", "OFFICIAL_STAGE_STDS", "stage_box_coder",
           "StageTargets", "CascadeRoIHeads", "mask_targets"]

OFFICIAL_STAGE_IOUS = (0.5, 0.6, 0.7)
OFFICIAL_STAGE_WEIGHTS = (1.0, 0.5, 0.25)
OFFICIAL_STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
WH_RATIO_CLIP = math.log(1000.0 / 16)


def stage_box_coder(stds: Sequence[float]) -> BoxCoder:
    """``DeltaXYWHBBoxCoder(means=0, stds)`` as torchvision's ``BoxCoder(weights=1 / stds)``."""
    return BoxCoder(weights=tuple(1.0 / s for s in stds), bbox_xform_clip=WH_RATIO_CLIP)


class StageTargets:
    """Sampled RoIs of one image for one stage.

    Attributes: ``rois`` (S, 4) positives first; ``labels`` (S,) class or ``C`` for background;
    ``gt_index`` (S,) matched ground truth (-1 for negatives); ``is_gt`` (S,) bool, RoIs that are
    ground-truth boxes added as proposals; ``num_pos``.
    """

    def __init__(self, rois, labels, gt_index, is_gt, num_pos):
        self.rois, self.labels, self.gt_index, self.is_gt, self.num_pos = rois, labels, gt_index, is_gt, num_pos


def mask_targets(gt_masks: torch.Tensor, gt_index: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """mmdet's ``mask_target``: ground-truth masks cropped to RoIs and resized, binarised at 0.5.

    Args:
        gt_masks: (G, H, W) uint8/bool masks in input pixels; gt_index: (P,) mask of each RoI;
        rois: (P, 4) boxes; size: output side (28).
    Returns:
        (P, size, size) float 0/1.
    """
    if rois.numel() == 0:
        return rois.new_zeros((0, size, size))
    boxes = torch.cat([gt_index[:, None].to(rois.dtype), rois], dim=1)
    crops = roi_align(gt_masks[:, None].float(), boxes.float(), (size, size), spatial_scale=1.0,
                      sampling_ratio=0, aligned=True)
    return (crops[:, 0] >= 0.5).float()


class CascadeRoIHeads(nn.Module):
    """Cascade (or single-stage Mask R-CNN) box and mask heads; see the module docstring.

    Args:
        num_classes: C object classes.
        in_channels: FPN channels (256).
        featmap_names: FPN levels pooled (strides 4..32).
        stage_ious / stage_weights / stage_stds: per stage (official values by default).
        num_samples, pos_fraction: RoIs sampled per image (512, 0.25).
        conv_channels, fc_channels, num_convs, num_fcs, norm: the box head trunk (256, 1024, 4, 1, BN).
        with_mask, mask_channels: FCN mask heads (256 channels), RoIAlign 14 -> 28 px masks.
        giou_weight: weight of the GIoU loss (10).
        score_thr, nms_iou, max_dets: test settings (0.05, 0.5, 100).
    """

    def __init__(self, num_classes: int, in_channels: int = 256, featmap_names: Sequence[str] = ("0", "1", "2", "3"),
                 stage_ious: Sequence[float] = OFFICIAL_STAGE_IOUS,
                 stage_weights: Sequence[float] = OFFICIAL_STAGE_WEIGHTS,
                 stage_stds: Sequence[Sequence[float]] = OFFICIAL_STAGE_STDS,
                 num_samples: int = 512, pos_fraction: float = 0.25, conv_channels: int = 256,
                 fc_channels: int = 1024, num_convs: int = 4, num_fcs: int = 1, norm: bool = True,
                 with_mask: bool = True, mask_channels: int = 256, giou_weight: float = 10.0,
                 score_thr: float = 0.05, nms_iou: float = 0.5, max_dets: int = 100):
        super().__init__()
        if not len(stage_ious) == len(stage_weights) == len(stage_stds) >= 1:
            raise ValueError(f"one IoU, weight and std tuple per stage, got {stage_ious}, {stage_weights}, "
                             f"{stage_stds}")
        self.num_classes = num_classes
        self.num_stages = len(stage_ious)
        self.stage_ious, self.stage_weights = tuple(stage_ious), tuple(stage_weights)
        self.stage_stds = tuple(tuple(s) for s in stage_stds)
        self.coders = [stage_box_coder(s) for s in self.stage_stds]
        self.num_samples, self.pos_fraction, self.giou_weight = num_samples, pos_fraction, giou_weight
        self.score_thr, self.nms_iou, self.max_dets = score_thr, nms_iou, max_dets
        self.with_mask, self.mask_size = with_mask, 28
        self.box_pool = AlignedMultiScaleRoIAlign(list(featmap_names), 7, 0)
        self.box_heads = nn.ModuleList(
            ConvFCBBoxHead(in_channels, num_classes, 7, num_convs, conv_channels, num_fcs, fc_channels, norm)
            for _ in range(self.num_stages))
        if with_mask:
            self.mask_pool = AlignedMultiScaleRoIAlign(list(featmap_names), 14, 0)
            self.mask_heads = nn.ModuleList(FCNMaskHead(in_channels, num_classes, 4, mask_channels)
                                            for _ in range(self.num_stages))

    # ------------------------------------------------------------------ targets
    def sample(self, stage: int, proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> StageTargets:
        """Assign and sample the RoIs of one image for ``stage`` (ground truths added as proposals)."""
        thr = self.stage_ious[stage]
        candidates = torch.cat([gt_boxes.to(proposals.dtype), proposals])
        is_gt = torch.zeros(candidates.shape[0], dtype=torch.bool, device=proposals.device)
        is_gt[:gt_boxes.shape[0]] = True
        assigned, _ = max_iou_assign(candidates, gt_boxes, thr, thr, thr, False)
        pos, neg = sample_pos_neg(assigned, self.num_samples, self.pos_fraction, generator)
        keep = torch.cat([pos, neg])
        labels = torch.full((keep.numel(),), self.num_classes, dtype=torch.int64, device=proposals.device)
        gt_index = torch.full((keep.numel(),), -1, dtype=torch.int64, device=proposals.device)
        if pos.numel():
            gt_index[:pos.numel()] = assigned[pos]
            labels[:pos.numel()] = gt_labels[assigned[pos]]
        return StageTargets(candidates[keep], labels, gt_index, is_gt[keep], pos.numel())

    def box_loss(self, stage: int, cls_logits: torch.Tensor, deltas: torch.Tensor,
                 targets: List[StageTargets], gt_boxes: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Unweighted ``loss_cls``, ``loss_bbox`` (GIoU on decoded class-specific boxes) and ``acc``."""
        labels = torch.cat([t.labels for t in targets])
        rois = torch.cat([t.rois for t in targets])
        total = max(labels.numel(), 1)
        loss_cls = F.cross_entropy(cls_logits.float(), labels, reduction="sum") / total
        pos = labels < self.num_classes
        if pos.any():
            pos_deltas = deltas.float().view(deltas.shape[0], self.num_classes, 4)[pos, labels[pos]]
            decoded = self.coders[stage].decode_single(pos_deltas, rois[pos].float())
            matched = torch.cat([gt[t.gt_index[:t.num_pos]] for t, gt in zip(targets, gt_boxes)]).float()
            loss_box = self.giou_weight * generalized_box_iou_loss(decoded, matched, reduction="sum") / total
        else:
            loss_box = deltas.sum() * 0.0
        acc = (cls_logits.argmax(1) == labels).float().mean() * 100 if labels.numel() else cls_logits.sum() * 0
        return {"loss_cls": loss_cls, "loss_bbox": loss_box, "acc": acc.detach()}

    @torch.no_grad()
    def refine(self, stage: int, targets: List[StageTargets], cls_logits: torch.Tensor, deltas: torch.Tensor,
               image_sizes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        """Next-stage proposals: sampled RoIs minus sampled ground truths, regressed by class, clipped."""
        labels = torch.cat([t.labels for t in targets])
        labels = torch.where(labels == self.num_classes, cls_logits[:, :-1].argmax(1), labels)
        out, start = [], 0
        for t, size in zip(targets, image_sizes):
            n = t.labels.numel()
            boxes = self.regress_by_class(stage, t.rois, labels[start:start + n], deltas[start:start + n], size)
            out.append(boxes[~t.is_gt])
            start += n
        return out

    def regress_by_class(self, stage: int, rois: torch.Tensor, labels: torch.Tensor, deltas: torch.Tensor,
                         image_size: Tuple[int, int]) -> torch.Tensor:
        """Decode the deltas of class ``labels`` (N,) for ``rois`` (N, 4); clipped to ``image_size``."""
        picked = deltas.float().view(deltas.shape[0], self.num_classes, 4)[torch.arange(labels.numel()), labels]
        boxes = self.coders[stage].decode_single(picked, rois.float())
        return clip_boxes_to_image(boxes, image_size)

    # ------------------------------------------------------------------ forward
    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_sizes: List[Tuple[int, int]], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        """Training: dict of weighted losses ``s{i}.loss_cls``, ``s{i}.loss_bbox``, ``s{i}.loss_mask``
        (and ``s{i}.acc``). Test: list per image of ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,)
        0-based, ``mask_probs`` (K, 28, 28) when masks are on (input-pixel coordinates)."""
        if self.training:
            return self._forward_train(features, proposals, image_sizes, targets)
        return self._forward_test(features, proposals, image_sizes)

    def _forward_train(self, features, proposals, image_sizes, targets):
        if targets is None:
            raise ValueError("CascadeRoIHeads needs targets in training mode")
        gt_boxes = [t["boxes"] for t in targets]
        losses = {}
        for i in range(self.num_stages):
            weight = self.stage_weights[i]
            samples = [self.sample(i, p.detach(), t["boxes"], t["labels"]) for p, t in zip(proposals, targets)]
            rois = [s.rois for s in samples]
            cls_logits, deltas = self.box_heads[i](self.box_pool(features, rois, image_sizes))
            stage_losses = self.box_loss(i, cls_logits, deltas, samples, gt_boxes)
            if self.with_mask:
                stage_losses["loss_mask"] = self.mask_loss(i, features, samples, targets, image_sizes)
            for name, value in stage_losses.items():
                losses[f"s{i}.{name}"] = value * weight if name.startswith("loss") else value
            if i < self.num_stages - 1:
                proposals = self.refine(i, samples, cls_logits.detach(), deltas.detach(), image_sizes)
        return losses

    def mask_loss(self, stage: int, features, samples: List[StageTargets], targets, image_sizes) -> torch.Tensor:
        """Unweighted binary cross-entropy of the stage's mask head on the positive RoIs."""
        pos_rois = [s.rois[:s.num_pos] for s in samples]
        if sum(r.shape[0] for r in pos_rois) == 0:
            return sum(p.sum() for p in self.mask_heads[stage].parameters()) * 0.0
        logits = self.mask_heads[stage](self.mask_pool(features, pos_rois, image_sizes))
        goal = torch.cat([mask_targets(t["masks"], s.gt_index[:s.num_pos], r, self.mask_size)
                          for s, t, r in zip(samples, targets, pos_rois)])
        labels = torch.cat([s.labels[:s.num_pos] for s in samples])
        picked = logits[torch.arange(labels.numel(), device=labels.device), labels]
        return F.binary_cross_entropy_with_logits(picked.float(), goal, reduction="mean")

    @torch.no_grad()
    def _forward_test(self, features, proposals, image_sizes):
        counts = [p.shape[0] for p in proposals]
        rois = [p.float() for p in proposals]
        all_logits = []
        for i in range(self.num_stages):
            cls_logits, deltas = self.box_heads[i](self.box_pool(features, rois, image_sizes))
            all_logits.append(cls_logits.float())
            if i < self.num_stages - 1:
                labels = cls_logits[:, :-1].argmax(1)
                rois = [self.regress_by_class(i, r, lab, d, size) for r, lab, d, size in
                        zip(rois, labels.split(counts), deltas.split(counts), image_sizes)]
        scores = torch.stack(all_logits).mean(0).softmax(-1)
        results = []
        for r, s, d, size in zip(rois, scores.split(counts), deltas.split(counts), image_sizes):
            results.append(self.postprocess_boxes(r, s, d, size))
        if self.with_mask:
            self._add_masks(features, results, image_sizes)
        return results

    def postprocess_boxes(self, rois: torch.Tensor, scores: torch.Tensor, deltas: torch.Tensor,
                          image_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """mmdet's ``multiclass_nms`` of the last stage's class-specific boxes for one image.

        Args: rois (N, 4), scores (N, C + 1) softmax, deltas (N, 4C). Returns ``boxes`` (K, 4),
        ``scores`` (K,), ``labels`` (K,), K <= ``max_dets``, sorted by decreasing score.
        """
        n, c = rois.shape[0], self.num_classes
        boxes = self.coders[-1].decode_single(deltas.float(), rois).view(n, c, 4)
        boxes = clip_boxes_to_image(boxes.reshape(-1, 4), image_size).view(n, c, 4)
        fg = scores[:, :c]
        keep = fg > self.score_thr
        box_k, score_k = boxes[keep], fg[keep]
        label_k = torch.nonzero(keep)[:, 1]
        order = batched_nms(box_k, score_k, label_k, self.nms_iou)[:self.max_dets]
        return {"boxes": box_k[order], "scores": score_k[order], "labels": label_k[order]}

    def _add_masks(self, features, results, image_sizes):
        boxes = [r["boxes"] for r in results]
        if sum(b.shape[0] for b in boxes) == 0:
            for r in results:
                r["mask_probs"] = r["boxes"].new_zeros((0, self.mask_size, self.mask_size))
            return
        pooled = self.mask_pool(features, boxes, image_sizes)
        probs = torch.stack([head(pooled).float().sigmoid() for head in self.mask_heads]).mean(0)
        labels = torch.cat([r["labels"] for r in results])
        probs = probs[torch.arange(labels.numel(), device=labels.device), labels]
        for r, p in zip(results, probs.split([b.shape[0] for b in boxes])):
            r["mask_probs"] = p
