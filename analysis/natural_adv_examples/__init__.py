"""ImageNet-A accuracy and calibration."""
