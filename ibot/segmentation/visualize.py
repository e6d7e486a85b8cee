"""PNG of validation predictions: image | ground truth | prediction, one row per image."""
import numpy as np

from ibot.viz.drawing import hstack, image_grid, save_image

from .transforms import IGNORE_INDEX

__all__ = ["palette", "colorize_labels", "save_prediction_panel"]


def palette(num_classes, seed=3):
    """A fixed ``uint8 (num_classes, 3)`` colour table (class 0 of a zero-reduced map is the first colour)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def colorize_labels(label, colours):
    """``(H, W)`` class map -> ``uint8 (H, W, 3)``; the ignore index is drawn black."""
    label = np.asarray(label)
    out = np.zeros(label.shape + (3,), np.uint8)
    valid = label != IGNORE_INDEX
    out[valid] = colours[np.clip(label[valid], 0, len(colours) - 1)]
    return out


def save_prediction_panel(path, samples, num_classes):
    """Write ``path`` (PNG): for each ``(image uint8 (H, W, 3), label (H, W), pred (H, W))`` one row
    image | ground truth | prediction. Rows are padded to the widest. Returns ``path``."""
    colours = palette(num_classes)
    rows = [hstack([img, colorize_labels(label, colours), colorize_labels(pred, colours)])
            for img, label, pred in samples]
    height = max(r.shape[0] for r in rows)
    width = max(r.shape[1] for r in rows)
    cells = [np.pad(r, ((0, height - r.shape[0]), (0, width - r.shape[1]), (0, 0)), constant_values=255)
             for r in rows]
    return save_image(image_grid(cells, ncol=1, pad=4, pad_value=255), path)
