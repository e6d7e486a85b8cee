"""Semi-supervised (1%/10% ImageNet) fine-tuning (spec section 2.7)."""
