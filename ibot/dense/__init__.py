"""Pieces shared by the dense transfer tasks (ADE20K segmentation, COCO detection).

- :mod:`ibot.dense.backbone`: the ViT wrapper of the official mmseg / mmdet backbones (tapped blocks
  as feature maps, the deconvolution / pooling pyramid, frozen stages, position-embedding resizing);
- :mod:`ibot.dense.layer_decay`: AdamW parameter groups of the official ``LayerDecayOptimizerConstructor``.
"""
from .backbone import DenseViT, pyramid_strides
from .layer_decay import dense_layer_id, layer_decay_param_groups, plain_param_groups

__all__ = ["DenseViT", "pyramid_strides", "dense_layer_id", "layer_decay_param_groups",
           "plain_param_groups"]
