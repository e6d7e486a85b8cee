"""Decode heads of the official configs (mmseg 0.12 ``UPerHead``, ``FCNHead``), in plain PyTorch.

Module and parameter names follow mmseg (``psp_modules.0.1.conv.weight``, ``lateral_convs.0.bn.*``,
``fpn_bottleneck.*``, ``convs.0.conv.*``, ``conv_seg.*``), so a released mmseg state dict loads.
Initialisation as mmcv: convolutions of ``ConvModule`` Kaiming-normal (fan_out, ReLU) without bias
(a norm follows), norms weight 1 / bias 0, the classifier ``conv_seg`` N(0, 0.01^2) with bias 0.
All resizing is bilinear with ``align_corners=False``. Shapes: ``B`` images, ``C`` classes,
``K`` head channels, inputs a tuple of maps ``(B, D_i, h_i, w_i)``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvModule", "PPM", "UPerHead", "FCNHead", "linear_head", "resize"]


def resize(x, size):
    """Bilinear resize of ``(B, C, h, w)`` to ``size`` (align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, named ``conv`` / ``bn`` / ``activate`` as mmcv's."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = norm_layer(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class _DecodeHead(nn.Module):
    """Classifier shared by the heads: Dropout2d(``dropout_ratio``) then a 1x1 ``conv_seg`` to C classes."""

    def __init__(self, channels, num_classes, dropout_ratio):
        super().__init__()
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def cls_seg(self, feat):
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


class PPM(nn.ModuleList):
    """Pyramid pooling: for every scale s, adaptive average pool to s x s, ConvModule 1x1, upsample back.

    ``forward(x (B, D, h, w))`` -> list of ``(B, K, h, w)``, one per scale.
    """

    def __init__(self, pool_scales, in_channels, channels, norm_layer=nn.BatchNorm2d):
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1,
                                                                            norm_layer=norm_layer))
                          for s in pool_scales])

    def forward(self, x):
        return [resize(stage(x), x.shape[-2:]) for stage in self]


class UPerHead(_DecodeHead):
    """UPerNet decoder (mmseg ``UPerHead``): PPM on the last map, FPN top-down fusion, 3x3 fusion conv.

    Args:
        in_channels: channels of the 4 input maps (4 x D for the ViT pyramid).
        channels: K (D in the official configs). pool_scales (1, 2, 3, 6); dropout_ratio 0.1.
    ``forward(maps)`` -> logits ``(B, C, h_0, w_0)`` at the resolution of the first (stride-4) map.
    """

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
                 norm_layer=nn.BatchNorm2d):
        super().__init__(channels, num_classes, dropout_ratio)
        in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, norm_layer)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1,
                                     norm_layer=norm_layer)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm_layer=norm_layer)
                                           for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1, norm_layer=norm_layer)
                                       for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1,
                                         norm_layer=norm_layer)

    def forward(self, maps):
        laterals = [conv(maps[i]) for i, conv in enumerate(self.lateral_convs)]
        top = maps[-1]
        laterals.append(self.bottleneck(torch.cat([top] + self.psp_modules(top), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """mmseg ``FCNHead`` with ``concat_input=False``.

    Args:
        in_channels: input channels (their sum with ``resize_concat``).
        channels: K; with ``num_convs=0`` the convs are the identity and K must equal ``in_channels``.
        num_convs: 3x3 ConvModules before the classifier (1 for the auxiliary head, 0 for linear).
        in_index: the input map used (an int), or a tuple of maps that are resized to the first one's
            size and concatenated (``input_transform='resize_concat'``).
    ``forward(maps)`` -> logits ``(B, C, h, w)`` at the selected (first) map's resolution.
    """

    def __init__(self, in_channels, channels, num_classes, num_convs=1, in_index=2, dropout_ratio=0.1,
                 norm_layer=nn.BatchNorm2d):
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_index = in_index
        if num_convs == 0:
            if in_channels != channels:
                raise ValueError(f"FCNHead with num_convs=0 needs channels == in_channels ({in_channels}), "
                                 f"got {channels}")
            self.convs = nn.Identity()
        else:
            self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1,
                                                    norm_layer=norm_layer) for i in range(num_convs)])

    def forward(self, maps):
        if isinstance(self.in_index, (tuple, list)):
            chosen = [maps[i] for i in self.in_index]
            x = torch.cat([resize(m, chosen[0].shape[-2:]) for m in chosen], dim=1)
        else:
            x = maps[self.in_index]
        return self.cls_seg(self.convs(x))


def linear_head(embed_dim, num_classes, num_inputs=4):
    """The linear protocol's head: ``FCNHead(num_convs=0, resize_concat)`` = one 1x1 conv on the
    concatenated ``num_inputs`` maps, no norm, no dropout."""
    dim = embed_dim * num_inputs
    return FCNHead(dim, dim, num_classes, num_convs=0, in_index=tuple(range(num_inputs)), dropout_ratio=0.0)
