"""COCO box and mask AP with pycocotools (the metric of ``--eval bbox segm``).

Detections are converted as mmdet's ``CocoDataset.results2json`` does: boxes ``(x1, y1, x2, y2)``
-> ``[x1, y1, x2 - x1, y2 - y1]``, labels -> the category ids of the annotation file, masks ->
compressed RLE. :func:`coco_evaluate` runs ``COCOeval`` for ``bbox`` and ``segm`` on the listed
images and returns the 12 standard numbers; the first six are AP, AP50, AP75, APs, APm, APl.
"""

from __future__ import annotations

import contextlib
import io
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["STAT_NAMES", "to_coco_results", "coco_evaluate", "format_table"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    cat_ids: Sequence[int], masks: Optional[np.ndarray] = None) -> Dict[str, List[dict]]:
    """One image's detections as COCO result entries.

    Args:
        boxes (K, 4) xyxy original pixels; scores (K,); labels (K,) 0-based; cat_ids: label -> id;
        masks: (K, H, W) bool or None.
    Returns:
        ``{'bbox': [...], 'segm': [...]}`` (``segm`` empty without masks).
    """
    out = {"bbox": [], "segm": []}
    for k in range(len(scores)):
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        entry = {"image_id": int(image_id), "category_id": int(cat_ids[int(labels[k])]), "score": float(scores[k])}
        out["bbox"].append(dict(entry, bbox=[x1, y1, x2 - x1, y2 - y1]))
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            out["segm"].append(dict(entry, segmentation=rle))
    return out


def coco_evaluate(coco_gt: COCO, results: Dict[str, List[dict]], image_ids: Iterable[int],
                  iou_types: Sequence[str] = ("bbox", "segm")) -> Dict[str, Dict[str, object]]:
    """COCOeval of ``results`` against ``coco_gt`` on ``image_ids``.

    Returns ``{iou_type: {'stats': {name: value in [0, 1]}, 'table': pycocotools' summary text}}``;
    an iou type without any detection scores 0 everywhere (pycocotools cannot load an empty list).
    """
    out = {}
    ids = sorted(int(i) for i in image_ids)
    for iou_type in iou_types:
        dets = results.get(iou_type, [])
        if not dets:
            out[iou_type] = {"stats": {n: 0.0 for n in STAT_NAMES},
                             "table": f"no {iou_type} detections: every AP is 0"}
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = coco_gt.loadRes([dict(d) for d in dets])
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            evaluator.summarize()
        out[iou_type] = {"stats": {n: float(v) for n, v in zip(STAT_NAMES, evaluator.stats)},
                         "table": table.getvalue().rstrip()}
    return out


def format_table(metrics: Dict[str, Dict[str, object]]) -> str:
    """The AP table (percent; ``n/a`` where pycocotools reports -1: no object of that size) and the
    ``bbox AP: x`` / ``segm AP: y`` lines of the command-line tools."""
    lines = ["| type | AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|---|"]
    for iou_type, m in metrics.items():
        s = m["stats"]
        lines.append(f"| {iou_type} | " + " | ".join(f"{100 * s[n]:.2f}" if s[n] >= 0 else "n/a"
                                                 for n in STAT_NAMES[:6]) + " |")
    for iou_type, m in metrics.items():
        lines.append(f"{iou_type} AP: {100 * m['stats']['AP']:.2f}")
    return "\n".join(lines)
