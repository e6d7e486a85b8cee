"""Official entry-point name: ``loader.py`` re-exports the data sets of :mod:`ibot.data.folders`.

``ImageFolderMask(root, transform=None, *, patch_size, pred_ratio, pred_ratio_var,
pred_aspect_ratio, pred_shape='block', pred_start_epoch=0, mask_crops=None, seed=None, **kwargs)``
returns ``(crops, target, masks)``; ``ImageFolderInstance`` returns ``(img, target, index)``.
"""

from ibot.data.folders import ImageFolderInstance, ImageFolderMask

__all__ = ["ImageFolderMask", "ImageFolderInstance"]
