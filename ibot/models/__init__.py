"""Networks of iBOT and the one architecture registry.

``create_model('vit_small', patch_size=16)`` / ``create_backbone(...)`` build any registered
backbone; the official factory names (``vit_small``, ``swin_tiny``, ...) and classes are exported too,
so ``ibot.models.__dict__[args.arch]`` works as ``models.__dict__[args.arch]`` did officially.
"""
from .head import DINOHead, iBOTHead
from .registry import (arch_choices, create_backbone, create_model, is_model, list_models, model_family,
                       register_model, resolve_name, unregister_model)
from .vision_transformer import VisionTransformer, vit_base, vit_large, vit_small, vit_tiny  # isort: skip
from .swin_transformer import SwinTransformer, check_swin_args, swin_base, swin_large, swin_small, swin_tiny
from .wrapper import MultiCropWrapper

deit_tiny = vit_tiny    # official aliases (main_ibot.py rewrites "deit" to "vit")
deit_small = vit_small

__all__ = ["VisionTransformer", "vit_tiny", "vit_small", "vit_base", "vit_large", "deit_tiny", "deit_small",
           "SwinTransformer", "swin_tiny", "swin_small", "swin_base", "swin_large", "check_swin_args",
           "DINOHead", "iBOTHead", "MultiCropWrapper",
           "register_model", "unregister_model", "create_model", "create_backbone", "list_models", "is_model",
           "model_family", "resolve_name", "arch_choices"]
