"""Backbones and heads under their official names (``models.__dict__[args.arch]`` lookups work)."""
from .head import DINOHead, iBOTHead
from .swin_transformer import SwinTransformer, check_swin_args, swin_base, swin_large, swin_small, swin_tiny
from .vision_transformer import VisionTransformer, vit_base, vit_large, vit_small, vit_tiny

__all__ = ["VisionTransformer", "vit_tiny", "vit_small", "vit_base", "vit_large",
           "SwinTransformer", "swin_tiny", "swin_small", "swin_base", "swin_large",
           "DINOHead", "iBOTHead", "check_swin_args"]
