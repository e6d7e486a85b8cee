"""The detector of the official configs: dense ViT -> FPN (256, 5 levels) -> RPN -> cascade RoI heads.

:func:`build_detector` assembles it from a :class:`ibot.detection.presets.DetectionConfig`:

* backbone: :class:`ibot.dense.DenseViT` (taps, deconv/pool pyramid, non-square ``pos_embed``);
* neck: torchvision's ``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` (mmdet's ``FPN``,
  ``num_outs=5``, no extra convs), re-initialised Xavier-uniform as mmdet's FPN;
* RPN: :func:`ibot.detection.rpn.build_rpn`; RoI heads: :class:`ibot.detection.cascade.CascadeRoIHeads`.

``Detector.forward(images (B, 3, H, W), image_sizes [(h, w)], targets=None)``: in training mode a
dict of losses (``loss_rpn_cls``, ``loss_rpn_bbox``, ``s{i}.loss_*``) plus ``s{i}.acc``; in eval mode
a list of per-image dicts in input pixels (see :class:`CascadeRoIHeads`). :func:`postprocess` maps
them to the original image and pastes the masks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ibot.dense import DenseViT
from ibot.detection.cascade import CascadeRoIHeads
from ibot.detection.rpn import build_rpn

__all__ = ["Detector", "build_detector", "postprocess", "paste_masks"]


class Detector(nn.Module):
    """Backbone + FPN + RPN + RoI heads; the attribute names (``backbone``, ``neck``...) give the
    layer-decay ids of :mod:`ibot.dense.layer_decay`."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, rpn: nn.Module, roi_heads: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.rpn, self.roi_heads = backbone, neck, rpn, roi_heads

    def features(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """FPN maps ``'0'..'3'`` (strides 4..32) and ``'pool'`` (stride 64), 256 channels each."""
        maps = self.backbone(images)
        return self.neck(OrderedDict((str(i), m) for i, m in enumerate(maps)))

    def forward(self, images: torch.Tensor, image_sizes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        feats = self.features(images)
        image_list = ImageList(images, [tuple(int(v) for v in s) for s in image_sizes])
        if self.training:
            if targets is None:
                raise ValueError("Detector needs targets in training mode")
            for t, size in zip(targets, image_list.image_sizes):
                t.setdefault("image_size", torch.tensor(size))
        proposals, rpn_losses = self.rpn(image_list, feats, targets)
        out = self.roi_heads(feats, proposals, image_list.image_sizes, targets)
        if self.training:
            losses = {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_bbox": rpn_losses["loss_rpn_box_reg"]}
            losses.update(out)
            return losses
        return out


def _xavier_fpn(fpn: FeaturePyramidNetwork) -> FeaturePyramidNetwork:
    for m in fpn.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return fpn


def build_detector(cfg, num_classes: int) -> Detector:
    """Build the detector of ``cfg`` (a ``DetectionConfig``) for ``num_classes`` object classes.

    The backbone keeps its random initialisation; load weights with ``detector.backbone.load_pretrained``.
    """
    backbone = DenseViT(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.backbone_img_size,
                        out_indices=cfg.out_indices, out_with_norm=cfg.out_with_norm,
                        drop_path_rate=cfg.drop_path, use_checkpoint=cfg.use_checkpoint,
                        frozen_stages=cfg.frozen_stages)
    neck = _xavier_fpn(FeaturePyramidNetwork(list(backbone.out_channels), cfg.fpn_channels,
                                             extra_blocks=LastLevelMaxPool()))
    rpn = build_rpn(cfg.fpn_channels, cfg.anchor_scale, cfg.anchor_ratios, cfg.anchor_strides,
                    train_pre_nms=cfg.rpn_train_pre_nms, train_post_nms=cfg.rpn_train_post_nms,
                    test_pre_nms=cfg.rpn_test_pre_nms, test_post_nms=cfg.rpn_test_post_nms,
                    nms_iou=cfg.rpn_nms_iou)
    stages = 3 if cfg.detector == "cascade_mask_rcnn" else 1
    roi_heads = CascadeRoIHeads(
        num_classes, cfg.fpn_channels, stage_ious=cfg.stage_ious[:stages],
        stage_weights=cfg.stage_weights[:stages], stage_stds=cfg.stage_stds[:stages],
        num_samples=cfg.rcnn_samples, pos_fraction=cfg.rcnn_pos_fraction, conv_channels=cfg.head_conv_channels,
        fc_channels=cfg.head_fc_channels, num_convs=cfg.head_num_convs, num_fcs=1, norm=True,
        with_mask=True, mask_channels=cfg.mask_channels, giou_weight=cfg.giou_weight,
        score_thr=cfg.test_score_thr, nms_iou=cfg.test_nms_iou, max_dets=cfg.test_max_dets)
    return Detector(backbone, neck, rpn, roi_heads)


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                threshold: float = 0.5) -> torch.Tensor:
    """mmdet's ``_do_paste_mask``: put ``(K, M, M)`` RoI mask probabilities into a ``height`` x
    ``width`` image at ``boxes`` (K, 4) by bilinear sampling at pixel centres, then binarise.

    Returns ``(K, height, width)`` bool (``prob >= threshold``).
    """
    k = boxes.shape[0]
    if k == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=boxes.device)
    x0, y0, x1, y1 = boxes.float().unbind(1)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1     # (K, H)
    gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1     # (K, W)
    grid = torch.stack([gx[:, None, :].expand(k, height, width), gy[:, :, None].expand(k, height, width)], dim=3)
    pasted = F.grid_sample(mask_probs[:, None].float(), grid, align_corners=False)[:, 0]
    return pasted >= threshold


def postprocess(result: Dict[str, torch.Tensor], scale: Tuple[float, float], orig_size: Tuple[int, int],
                mask_threshold: float = 0.5) -> Dict[str, torch.Tensor]:
    """Map one image's detections from input pixels to the original image (mmdet ``rescale=True``).

    Args:
        result: ``boxes`` (K, 4), ``scores``, ``labels``, optional ``mask_probs`` (K, 28, 28).
        scale: ``(w_scale, h_scale)`` applied by the test resize; orig_size: ``(height, width)``.
    Returns:
        ``boxes`` (K, 4) original pixels, ``scores``, ``labels``, ``masks`` (K, H, W) bool if any.
    """
    factor = torch.tensor([scale[0], scale[1], scale[0], scale[1]], device=result["boxes"].device)
    out = {"boxes": result["boxes"] / factor, "scores": result["scores"], "labels": result["labels"]}
    if "mask_probs" in result:
        out["masks"] = paste_masks(result["mask_probs"], out["boxes"], orig_size[0], orig_size[1], mask_threshold)
    return out
