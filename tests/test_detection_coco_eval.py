"""Detection: the reported COCO AP is pycocotools' on the same detections (hand-made cases)."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ibot.detection.coco_eval import coco_evaluate, format_table, to_coco_results
from ibot.detection.dataset import load_coco

# two images; category 1: boxes A and B in image 1, category 2: box C in image 2 (xyxy)
GT = {1: [(1, (10, 10, 40, 40)), (1, (50, 50, 80, 80))], 2: [(2, (0, 0, 20, 20))]}


def _gt_file(tmp_path):
    from pycocotools import mask as mask_utils
    images = [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100} for i in GT]
    anns = []
    for image_id, objs in GT.items():
        for cat, (x1, y1, x2, y2) in objs:
            m = np.zeros((100, 100), np.uint8)
            m[y1:y2, x1:x2] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
                         "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()}})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return str(path)


def _detections(case):
    """Per image: (boxes xyxy, scores, labels 0-based, masks)."""
    dets = {1: [((10, 10, 40, 40), 0.9, 0), ((50, 50, 80, 80), 0.8, 0)], 2: [((0, 0, 20, 20), 0.7, 1)]}
    if case == "shifted":
        dets[2] = [((4, 0, 24, 20), 0.7, 1)]      # IoU 16 / 24 = 0.667 with C
    if case == "missing":
        dets[1] = dets[1][:1]                     # B not detected
    out = {}
    for image_id, entries in dets.items():
        boxes = np.array([e[0] for e in entries], np.float32)
        masks = np.zeros((len(entries), 100, 100), bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            masks[k, y1:y2, x1:x2] = True
        out[image_id] = (boxes, np.array([e[1] for e in entries]), np.array([e[2] for e in entries]), masks)
    return out


def _reference_ap(gt_file, results, iou_type):
    """pycocotools called directly on a results file."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("case, ap, ap50, ap75", [
    ("perfect", 1.0, 1.0, 1.0),
    # category 2 matches at IoU 0.50..0.65 (4 of 10 thresholds): (1 + 0.4) / 2; AP75 (1 + 0) / 2
    ("shifted", 0.7, 1.0, 0.5),
    # category 1: recall 1/2 at precision 1 -> 51 of the 101 recall points: (51/101 + 1) / 2
    ("missing", (51 / 101 + 1) / 2, (51 / 101 + 1) / 2, (51 / 101 + 1) / 2),
])
def test_reported_ap_equals_pycocotools(tmp_path, case, ap, ap50, ap75):
    gt_file = _gt_file(tmp_path)
    coco = load_coco(gt_file)
    results = {"bbox": [], "segm": []}
    for image_id, (boxes, scores, labels, masks) in _detections(case).items():
        entry = to_coco_results(image_id, boxes, scores, labels, [1, 2], masks)
        results["bbox"] += entry["bbox"]
        results["segm"] += entry["segm"]
    metrics = coco_evaluate(coco, results, [1, 2])
    box = metrics["bbox"]["stats"]
    assert (box["AP"], box["AP50"], box["AP75"]) == pytest.approx((ap, ap50, ap75), abs=1e-6)
    assert results["bbox"][0]["bbox"] == [10.0, 10.0, 30.0, 30.0]           # xyxy -> xywh
    for iou_type in ("bbox", "segm"):
        ref = _reference_ap(gt_file, results[iou_type], iou_type)
        assert [metrics[iou_type]["stats"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == \
            pytest.approx(list(ref[:6]), abs=1e-12)
    if case == "perfect":
        assert metrics["segm"]["stats"]["AP"] == pytest.approx(1.0)
        table = format_table(metrics)
        assert "bbox AP: 100.00" in table and "segm AP: 100.00" in table
        assert "n/a" in table                                               # no medium / large object


def test_no_detection_scores_zero(tmp_path):
    coco = load_coco(_gt_file(tmp_path))
    metrics = coco_evaluate(coco, {"bbox": [], "segm": []}, [1, 2])
    assert metrics["bbox"]["stats"]["AP"] == 0.0 and metrics["segm"]["stats"]["AP"] == 0.0
