"""Official name of the BEiT-style fine-tuning ViT; it lives in :mod:`ibot.eval.beit_vit`."""
from ibot.eval.beit_vit import (MODELS, VisionTransformer, create_model, load_finetune_checkpoint, vit_base,
                                vit_large, vit_small, vit_tiny)

__all__ = ["VisionTransformer", "MODELS", "create_model", "load_finetune_checkpoint", "vit_tiny", "vit_small",
           "vit_base", "vit_large"]
