"""ImageNet-C corruption errors and the unnormalised mCE."""
