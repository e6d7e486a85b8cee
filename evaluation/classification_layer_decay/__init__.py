"""ImageNet fine-tuning with layer-wise lr decay (BEiT recipe, spec section 2.5)."""
