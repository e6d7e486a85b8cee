"""The official weight initialisation shared by the backbones and heads."""
import torch.nn as nn
from timm.layers import trunc_normal_


def trunc_normal_init(m):
    """For ``module.apply``: Linear weights truncated normal (std 0.02, bounds ±2), Linear biases 0,
    affine LayerNorms weight 1 / bias 0 (their default); other modules untouched."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)
