"""ImageNet-9 background variations and the adversarial-backgrounds challenge."""
