"""RoI feature extraction and the per-RoI heads of the official configs (mmdet 2.x semantics).

* :class:`AlignedMultiScaleRoIAlign`: torchvision's ``MultiScaleRoIAlign`` level mapping (which is
  mmdet's ``finest_scale=56`` rule: level ``floor(log2(sqrt(w*h) / 56))`` clamped to 0..3) with
  ``roi_align(aligned=True)``, the mmcv default that torchvision's pooler does not expose;
* :class:`ConvFCBBoxHead`: ``num_convs`` 3x3 convs (conv -> BatchNorm -> ReLU), ``num_fcs`` FCs
  (ReLU), then a classifier over ``num_classes + 1`` (background last, as mmdet) and a
  class-specific regressor ``4 * num_classes``;
* :class:`FCNMaskHead`: 4 3x3 convs (ReLU), a 2x2 stride-2 deconvolution (ReLU) and a 1x1 conv to
  one mask logit map per class (14 -> 28 px).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

__all__ = ["AlignedMultiScaleRoIAlign", "ConvFCBBoxHead", "FCNMaskHead"]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with pixel-aligned sampling (mmcv ``RoIAlign(aligned=True)``) and the
    configured strides (mmdet ``featmap_strides``).

    torchvision infers the level scales from the first batch (feature size / largest unpadded image,
    rounded to a power of 2), which is wrong when small images sit in a larger padded batch; here
    they are ``1 / stride``. ``forward(features: dict of (B, C, H_l, W_l), boxes: list of (N_i, 4),
    image_shapes)`` -> ``(sum N_i, C, S, S)``.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int, sampling_ratio: int,
                 featmap_strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        if len(featmap_strides) != len(featmap_names):
            raise ValueError(f"one stride per pooled level: {featmap_names} vs {featmap_strides}")
        self.scales = [1.0 / s for s in featmap_strides]
        self.map_levels = initLevelMapper(int(math.log2(featmap_strides[0])), int(math.log2(featmap_strides[-1])),
                                          self.canonical_scale, self.canonical_level)

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + tuple(self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == level).flatten()
            if idx.numel():
                pooled = roi_align(feat, rois[idx].to(feat.dtype), self.output_size, spatial_scale=scale,
                                   sampling_ratio=self.sampling_ratio, aligned=True)
                out[idx] = pooled.to(out.dtype)
        return out


def _conv_bn_relu(cin: int, cout: int, norm: bool) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv] + ([nn.BatchNorm2d(cout)] if norm else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ConvFCBBoxHead(nn.Module):
    """mmdet's ``ConvFCBBoxHead`` with shared convs and FCs (official: 4 convs + 1 FC, BatchNorm).

    Args:
        in_channels: RoI feature channels (256); roi_size: RoI side (7).
        num_classes: object classes (background is index ``num_classes``).
        num_convs, conv_channels, num_fcs, fc_channels: the shared trunk (4, 256, 1, 1024).
        norm: BatchNorm after each conv (``norm_cfg=SyncBN``; converted to SyncBatchNorm under DDP).
    ``forward(roi_feats (N, C, S, S))`` -> ``(cls_logits (N, num_classes + 1), deltas (N, 4 * num_classes))``.
    """

    def __init__(self, in_channels: int, num_classes: int, roi_size: int = 7, num_convs: int = 4,
                 conv_channels: int = 256, num_fcs: int = 1, fc_channels: int = 1024, norm: bool = True):
        super().__init__()
        self.num_classes = num_classes
        convs, c = [], in_channels
        for _ in range(num_convs):
            convs.append(_conv_bn_relu(c, conv_channels, norm))
            c = conv_channels
        self.shared_convs = nn.Sequential(*convs)
        fcs, d = [], c * roi_size * roi_size
        for _ in range(num_fcs):
            fc = nn.Linear(d, fc_channels)
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
            fcs += [fc, nn.ReLU(inplace=True)]
            d = fc_channels
        self.shared_fcs = nn.Sequential(*fcs)
        self.fc_cls = nn.Linear(d, num_classes + 1)
        self.fc_reg = nn.Linear(d, 4 * num_classes)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.shared_fcs(self.shared_convs(x).flatten(1))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """mmdet's ``FCNMaskHead`` (4 convs, deconv x2, 1x1 logits per class, no normalisation).

    ``forward(roi_feats (N, C, 14, 14))`` -> mask logits ``(N, num_classes, 28, 28)``.
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, conv_channels: int = 256):
        super().__init__()
        convs, c = [], in_channels
        for _ in range(num_convs):
            convs.append(_conv_bn_relu(c, conv_channels, norm=False))
            c = conv_channels
        self.convs = nn.Sequential(*convs)
        self.upsample = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.conv_logits = nn.Conv2d(c, num_classes, 1)
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_logits(self.relu(self.upsample(self.convs(x))))

