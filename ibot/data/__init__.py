"""Data of pre-training: multi-crop augmentation, masks, image-folder data sets, Fashion-MNIST folders."""
