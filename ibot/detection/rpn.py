"""The region proposal network: torchvision's ``RegionProposalNetwork`` with mmdet's assignment.

torchvision already does what mmdet's ``RPNHead`` does at test time (top-k per level, clipping,
NMS per level, top-n) and its losses (sigmoid cross-entropy and smooth-L1 with beta 1/9, both
divided by the number of sampled anchors). Two mmdet rules differ and are added here:

* ``allowed_border=0``: anchors that leave the (unpadded) image get no label in training;
* low-quality matches need an IoU of at least ``min_pos_iou`` (0.3), where torchvision takes any;
* a batch in which no anchor gets a label (small images, where every anchor crosses the border)
  has zero losses, as mmdet's ``avg_factor + eps`` division gives; torchvision divides by zero
  there (NaN).

The anchor generator keeps mmdet's unrounded base anchors (torchvision rounds them to integers).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from ibot.detection.assign import IGNORED, inside_flags, max_iou_assign

__all__ = ["MMDetAnchorGenerator", "MMDetRPN", "build_rpn"]


class MMDetAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` with mmdet 2.x base anchors (centre offset 0, not rounded) and fixed strides.

    torchvision infers each level's stride as ``padded size // map size``, which is wrong for the
    stride-64 level when the padded size is a multiple of 32 but not of 64 (``ceil`` pooling);
    mmdet uses the configured strides, as here.
    """

    def __init__(self, sizes, aspect_ratios, strides):
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def forward(self, image_list, feature_maps):
        """Anchors ``(sum_l A * H_l * W_l, 4)`` per image, levels in order, locations row-major."""
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in range(len(image_list.image_sizes))]

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        """Zero-centred anchors ``(len(ratios) * len(scales), 4)``; ratio = height / width."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN whose training labels follow mmdet's ``MaxIoUAssigner`` and border rule.

    Targets must carry ``boxes`` (G, 4) and ``image_size`` (2,) = (height, width) of the unpadded
    input; ``forward`` is torchvision's.
    """

    def __init__(self, *args, min_pos_iou: float = 0.3, allowed_border: float = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_pos_iou = min_pos_iou
        self.allowed_border = allowed_border

    def assign_targets_to_anchors(self, anchors: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        """Labels (1 object, 0 background, -1 ignored) and matched boxes for every anchor."""
        labels, matched = [], []
        for anchors_i, target in zip(anchors, targets):
            gt = target["boxes"]
            assigned, _ = max_iou_assign(anchors_i, gt, self.proposal_matcher.high_threshold,
                                         self.proposal_matcher.low_threshold, self.min_pos_iou, True)
            label = torch.zeros(anchors_i.shape[0], dtype=torch.float32, device=anchors_i.device)
            label[assigned >= 0] = 1.0
            label[assigned == IGNORED] = -1.0
            h, w = (int(v) for v in target["image_size"])
            label[~inside_flags(anchors_i, h, w, self.allowed_border)] = -1.0
            if gt.numel():
                matched.append(gt[assigned.clamp(min=0)])
            else:
                matched.append(torch.zeros_like(anchors_i))
            labels.append(label)
        return labels, matched

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        """torchvision's losses; zero (still in the graph) when no anchor of the batch is sampled."""
        if not any(bool((label >= 0).any()) for label in labels):
            zero = objectness.sum() * 0.0 + pred_bbox_deltas.sum() * 0.0
            return zero, zero.clone()
        return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)


def build_rpn(in_channels: int, anchor_scale: float, ratios: Sequence[float], strides: Sequence[int],
              train_pre_nms: int = 2000, train_post_nms: int = 2000, test_pre_nms: int = 1000,
              test_post_nms: int = 1000, nms_iou: float = 0.7, num_samples: int = 256,
              pos_fraction: float = 0.5) -> MMDetRPN:
    """The official RPN: anchors of side ``anchor_scale * stride`` per level, ratios 0.5/1/2.

    ``train_*``/``test_*`` are the per-level top-k before NMS (``nms_pre``) and the kept count after
    it (``max_per_img``); the IoU thresholds are mmdet's 0.7 / 0.3.
    """
    sizes = tuple((anchor_scale * s,) for s in strides)
    generator = MMDetAnchorGenerator(sizes, (tuple(ratios),) * len(strides), strides)
    head = RPNHead(in_channels, generator.num_anchors_per_location()[0])
    return MMDetRPN(generator, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                    batch_size_per_image=num_samples, positive_fraction=pos_fraction,
                    pre_nms_top_n={"training": train_pre_nms, "testing": test_pre_nms},
                    post_nms_top_n={"training": train_post_nms, "testing": test_post_nms},
                    nms_thresh=nms_iou)

