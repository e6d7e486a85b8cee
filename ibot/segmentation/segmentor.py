"""Encoder-decoder segmentor (mmseg 0.12 ``EncoderDecoder``): losses and sliding-window inference.

Training: logits of the decode head (and of the auxiliary head) are resized bilinearly to the label
size and scored with cross-entropy (ignore 255). As in mmseg 0.12 the mean runs over ALL pixels,
ignored ones counting as zero loss (``avg_non_ignore=False``); the auxiliary loss is weighted 0.4.

Inference (:func:`slide_logits`): windows of ``crop`` px every ``stride`` px (the last window of a
row / column is aligned with the border), logits of overlapping windows summed and divided by the
number of windows covering each pixel. :func:`predict` resizes those logits to the original image,
takes the softmax, averages it over test scales and flips, and returns the argmax.
"""
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot.dense.backbone import DenseViT

from .heads import FCNHead, UPerHead, linear_head, resize
from .transforms import IGNORE_INDEX, prepare_test_image, test_scales

__all__ = ["EncoderDecoder", "build_segmentor", "segmentation_loss", "window_grid", "slide_logits",
           "predict"]


def segmentation_loss(logits, label, weight=1.0, avg_non_ignore=False):
    """Cross-entropy of ``logits (B, C, h, w)`` (resized to the label) against ``label (B, H, W)``.

    ``avg_non_ignore=False`` (mmseg 0.12): sum over labelled pixels / all pixels. Scalar tensor.
    """
    logits = resize(logits, label.shape[-2:])
    loss = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none")
    if avg_non_ignore:
        return weight * loss.sum() / (label != IGNORE_INDEX).sum().clamp(min=1)
    return weight * loss.mean()


class EncoderDecoder(nn.Module):
    """``backbone`` (:class:`DenseViT`) + ``decode_head`` (+ optional ``auxiliary_head``).

    ``forward(img (B, 3, H, W))`` -> decode logits resized to ``(B, C, H, W)``;
    ``forward(img, label (B, H, W))`` = :meth:`losses` -> dict of scalar tensors (``loss``,
    ``loss_decode``, ``loss_aux``, ``acc``), so that a DDP wrapper sees the training forward.
    """

    def __init__(self, backbone, decode_head, auxiliary_head=None, aux_loss_weight=0.4):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_loss_weight = aux_loss_weight
        self.num_classes = decode_head.num_classes

    def forward(self, img, label=None):
        """Encode-decode: logits ``(B, C, H, W)`` at the input resolution (the losses with ``label``)."""
        if label is not None:
            return self.losses(img, label)
        return resize(self.decode_head(self.backbone(img)), img.shape[-2:])

    def losses(self, img, label):
        """Training losses for ``img (B, 3, H, W)`` and ``label (B, H, W)`` int64."""
        maps = self.backbone(img)
        logits = self.decode_head(maps)
        out = {"loss_decode": segmentation_loss(logits, label)}
        if self.auxiliary_head is not None:
            out["loss_aux"] = segmentation_loss(self.auxiliary_head(maps), label, self.aux_loss_weight)
        out["loss"] = sum(v for k, v in out.items() if k.startswith("loss_"))
        with torch.no_grad():
            valid = label != IGNORE_INDEX
            pred = resize(logits, label.shape[-2:]).argmax(1)
            out["acc"] = 100.0 * ((pred == label) & valid).sum() / valid.sum().clamp(min=1)
        return out


def build_segmentor(preset, num_classes=None, use_checkpoint=False):
    """The model of a preset: DenseViT + UPerHead/FCN auxiliary (``upernet``) or the linear head."""
    num_classes = num_classes or preset.num_classes
    backbone = DenseViT(preset.arch, patch_size=preset.patch_size, img_size=preset.crop_size,
                        out_indices=preset.out_indices, out_with_norm=preset.out_with_norm,
                        with_fpn=preset.with_fpn, frozen_stages=preset.frozen_stages,
                        drop_path_rate=preset.drop_path_rate, use_checkpoint=use_checkpoint)
    dim = backbone.embed_dim
    if preset.head == "linear":
        return EncoderDecoder(backbone, linear_head(dim, num_classes, len(preset.out_indices)), None, 0.0)
    decode = UPerHead([dim] * 4, preset.channels if preset.channels else dim, num_classes,
                      pool_scales=preset.pool_scales, dropout_ratio=preset.dropout_ratio)
    aux = FCNHead(dim, preset.aux_channels, num_classes, num_convs=1, in_index=preset.aux_in_index,
                  dropout_ratio=preset.dropout_ratio)
    return EncoderDecoder(backbone, decode, aux, preset.aux_loss_weight)


def window_grid(height, width, crop, stride):
    """Windows ``(y1, y2, x1, x2)`` of mmseg's slide inference over an ``height x width`` image.

    ``ceil((size - crop) / stride) + 1`` positions per axis (1 when the image is smaller than the
    crop); each window starts at ``i * stride`` and is shifted back so that it ends inside the image.
    """
    def starts(size):
        n = max(size - crop + stride - 1, 0) // stride + 1
        out = []
        for i in range(n):
            end = min(i * stride + crop, size)
            out.append((max(end - crop, 0), end))
        return out
    return [(y1, y2, x1, x2) for y1, y2 in starts(height) for x1, x2 in starts(width)]


@torch.no_grad()
def slide_logits(model, img, crop, stride, num_classes):
    """Sliding-window logits ``(B, C, H, W)`` of ``img (B, 3, H, W)``: windows summed, / coverage count.

    ``model(window (B, 3, h, w)) -> (B, C, h, w)``.
    """
    batch, _, height, width = img.shape
    preds = img.new_zeros((batch, num_classes, height, width))
    count = img.new_zeros((batch, 1, height, width))
    for y1, y2, x1, x2 in window_grid(height, width, crop, stride):
        preds[:, :, y1:y2, x1:x2] += model(img[:, :, y1:y2, x1:x2]).float()
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def predict(model, img, preset, device, mode="slide", autocast=None):
    """Label map ``int64 (H, W)`` of one uint8 RGB image ``(H, W, 3)`` with the preset's test pipeline.

    For every test ratio (and its horizontal flip when ``preset.test_flip``) the image is resized,
    segmented (``mode`` 'slide' or 'whole'), the logits resized back to ``(H, W)`` and soft-maxed;
    the probabilities are averaged and the argmax returned.
    """
    height, width = img.shape[:2]
    total = None
    sizes = test_scales(height, width, preset.eval_scale, preset.test_ratios, preset.setr_resize,
                        preset.crop_size)
    flips = (False, True) if preset.test_flip else (False,)
    for size in sizes:
        x = prepare_test_image(img, size)[None].to(device)
        for flip in flips:
            xi = x.flip(-1) if flip else x
            with autocast() if autocast else nullcontext():
                if mode == "slide":
                    logits = slide_logits(model, xi, preset.crop_size, preset.test_stride, model_classes(model))
                else:
                    logits = model(xi).float()
            prob = F.softmax(resize(logits.float(), (height, width)), dim=1)
            if flip:
                prob = prob.flip(-1)
            total = prob if total is None else total + prob
    return (total / (len(sizes) * len(flips)))[0].argmax(0)


def model_classes(model):
    """Number of classes C of a segmentor (unwrapping DDP)."""
    return getattr(model, "module", model).num_classes

