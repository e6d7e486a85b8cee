"""Detection: COCO reading (mmdet rules, clear errors), transforms, presets and the Fashion-MNIST builder."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ibot.detection.dataset import CocoFormatError, CocoInstances, EpochIndexSampler, check_coco_layout, load_coco
from ibot.detection.presets import PRESETS, crop_scales, get_config, eval_scale, train_scales
from ibot.detection.transforms import EvalTransform, TrainTransform, collate, hflip, random_crop, rescale_size


def _write_coco(root, split, images, anns, cats=({"id": 3, "name": "x"}, {"id": 7, "name": "y"})):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (120, 120, 120)).save(
            os.path.join(root, f"{split}2017", img["file_name"]))
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": list(cats)}, f)


def _ann(i, image_id, cat, bbox, crowd=0, area=None):
    x, y, w, h = bbox
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "iscrowd": crowd,
            "area": w * h if area is None else area,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


@pytest.fixture
def coco_root(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 60} for i in (1, 2, 3, 4)]
    images.append({"id": 5, "file_name": "5.png", "height": 20, "width": 60})          # < 32 px
    anns = [_ann(1, 1, 7, (10, 5, 20, 10)), _ann(2, 1, 3, (0, 0, 60, 40), crowd=1),
            _ann(3, 2, 3, (30, 20, 0.5, 10)),                                          # width < 1: skipped
            _ann(4, 3, 3, (70, 10, 5, 5)),                                             # outside the image
            _ann(5, 5, 3, (1, 1, 5, 5))]                                               # image 4: none
    for split in ("train", "val"):
        _write_coco(str(tmp_path), split, images, anns)
    return str(tmp_path)


def test_mmdet_reading_rules(coco_root):
    train = CocoInstances(coco_root, "train", EvalTransform(40), train=True)
    # images 1, 2, 3 have annotations (crowd and invalid ones count, as in mmdet); 4 has none; 5 is < 32 px
    assert train.img_ids == [1, 2, 3]
    assert train.cat_ids == [3, 7] and train.class_names == ["x", "y"]
    t = train.annotations(1)                                   # the crowd box is ignored
    np.testing.assert_allclose(t["boxes"], [[10, 5, 30, 15]])
    assert t["labels"].tolist() == [1]                         # category 7 -> label 1 (sorted ids)
    assert t["masks"].shape == (1, 40, 60) and t["masks"].sum() == 20 * 10
    assert len(train.annotations(2)["boxes"]) == 0 and len(train.annotations(3)["boxes"]) == 0
    val = CocoInstances(coco_root, "val", EvalTransform(40), train=False)
    assert val.img_ids == [1, 2, 3, 4, 5]                      # the validation split keeps every image


def test_missing_files_and_bad_keys_are_named(tmp_path, coco_root):
    with pytest.raises(FileNotFoundError, match="instances_train2017.json.*train2017/"):
        check_coco_layout(str(tmp_path / "nothing"), ("train",))
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": []')
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        load_coco(str(bad))
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 4}], "annotations": [],
                               "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(CocoFormatError, match=r"images\[0\] has no key 'width'"):
        load_coco(str(bad))
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    data = json.loads(bad.read_text())
    del data["annotations"]
    bad.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match="key 'annotations'"):
        load_coco(str(bad))


def test_rescale_flip_crop_rules():
    assert rescale_size(480, 640, 800, 1333) == (800, 1067)     # short side reaches 800
    assert rescale_size(100, 1000, 800, 1333) == (133, 1333)    # long side capped
    img = np.zeros((10, 10, 3), np.uint8)
    tgt = {"boxes": np.array([[1, 2, 4, 5]], np.float32), "labels": np.array([0]),
           "masks": np.zeros((1, 10, 10), np.uint8)}
    tgt["masks"][0, 2:5, 1:4] = 1
    _, flipped = hflip(img, tgt)
    np.testing.assert_allclose(flipped["boxes"], [[6, 2, 9, 5]])
    assert flipped["masks"][0, 2:5, 6:9].all() and flipped["masks"].sum() == 9
    rng = np.random.default_rng(0)
    two = {"boxes": np.array([[0, 0, 3, 3], [8, 8, 10, 10]], np.float32), "labels": np.array([0, 1]),
           "masks": np.ones((2, 10, 10), np.uint8)}
    cropped_img, cropped = random_crop(rng, np.zeros((10, 10, 3), np.uint8), two, (5, 5))
    assert cropped_img.shape[:2] == (5, 5)
    assert len(cropped["boxes"]) == len(cropped["labels"]) == len(cropped["masks"])
    assert (cropped["boxes"] <= 5).all() and (cropped["boxes"][:, 2] > cropped["boxes"][:, 0]).all()


def test_resize_policy_follows_img_scale():
    assert train_scales(800) == (tuple(range(480, 801, 32)), 1333)
    assert crop_scales(800) == ((400, 500, 600), (384, 600))
    assert eval_scale(800) == (800, 1333)
    assert train_scales(64) == ((38, 41, 44, 46, 49, 51, 54, 56, 59, 61, 64), 107)
    assert eval_scale(400) == (400, 667)


def test_train_transform_and_padding(coco_root):
    ds = CocoInstances(coco_root, "train", TrainTransform(40), train=True, seed=1)
    a, b = ds[(0, 0)], ds[(0, 0)]
    assert (a[0] == b[0]).all()                                 # augmentation = f(seed, epoch, index)
    shapes = {tuple(ds[(e, 0)][0].shape) for e in range(12)}
    assert len(shapes) > 1                                      # multi-scale
    for img, tgt, meta in (ds[(e, 0)] for e in range(6)):
        assert min(img.shape[1:]) <= 40 and max(img.shape[1:]) <= 67
    images, targets, metas = collate([ds[(0, 0)], ds[(1, 0)]])
    assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    assert targets[0]["masks"].shape[1:] == images.shape[2:]


def test_epoch_index_sampler_order_and_resume():
    s = EpochIndexSampler(10, shuffle=True, seed=3, num_replicas=2, rank=1)
    s.set_epoch(4)
    full = list(s)
    assert len(full) == 5 and all(e == 4 for e, _ in full)
    s.set_epoch(4, start=2)
    assert list(s) == full[2:]
    s.set_epoch(5)
    assert [i for _, i in s] != [i for _, i in full]


def test_presets_hold_the_official_values():
    s1, b1 = get_config("vit_small_1x"), get_config("vit_base_1x")
    assert (s1.arch, s1.backbone_img_size, s1.drop_path, s1.layer_decay, s1.batch_size_per_gpu) == \
        ("vit_small", (800, 1008), 0.1, 0.8, 4)
    assert (b1.arch, b1.backbone_img_size, b1.drop_path, b1.layer_decay, b1.batch_size_per_gpu) == \
        ("vit_base", (672, 1092), 0.2, 0.75, 2)
    for cfg in (s1, b1):
        assert (cfg.epochs, cfg.lr_steps, cfg.warmup_iters, cfg.warmup_ratio) == (12, (8, 11), 500, 0.001)
        assert (cfg.lr, cfg.weight_decay, cfg.betas) == (1e-4, 0.05, (0.9, 0.999))
        assert (cfg.fpn_channels, cfg.anchor_scale, cfg.anchor_ratios, cfg.anchor_strides) == \
            (256, 8.0, (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
        assert (cfg.rpn_test_pre_nms, cfg.rpn_test_post_nms, cfg.rpn_nms_iou) == (1000, 1000, 0.7)
        assert (cfg.test_score_thr, cfg.test_nms_iou, cfg.test_max_dets, cfg.mask_threshold) == (0.05, 0.5, 100, 0.5)
        assert (cfg.rcnn_samples, cfg.rcnn_pos_fraction, cfg.head_num_convs, cfg.head_fc_channels) == \
            (512, 0.25, 4, 1024)
        assert (cfg.giou_weight, cfg.out_indices, cfg.out_with_norm, cfg.img_scale) == (10.0, (3, 5, 7, 11), False, 800)
    s3, b3 = get_config("vit_small_3x"), get_config("vit_base_3x")
    assert (s3.epochs, s3.lr_steps, s3.layer_decay, b3.layer_decay, s3.batch_size_per_gpu) == \
        (36, (27, 33), 0.75, 0.65, 2)
    assert get_config("vit_small_1x", img_scale=400, lr=None).img_scale == 400
    assert sorted(PRESETS) == ["fmnist_tiny", "vit_base_1x", "vit_base_3x", "vit_small_1x", "vit_small_3x"]
    with pytest.raises(ValueError, match="unknown detection setting"):
        get_config("vit_small_1x", anchor_size=3)
    with pytest.raises(ValueError, match="unknown --preset"):
        get_config("vit_huge_1x")


def test_fmnist_coco_builder(tmp_path):
    from ibot.data.fmnist_coco import build_fmnist_coco
    info = build_fmnist_coco(str(tmp_path), num_train=6, num_val=4, canvas=48, empty_every=3, seed=1)
    assert info["built"] and info["train"] == 6 and info["val"] == 4
    ds = CocoInstances(str(tmp_path), "val", EvalTransform(48), train=False)
    assert ds.num_classes == 10 and len(ds) == 4
    assert len(ds.annotations(1)["boxes"]) == 0                 # every 3rd canvas (ids 1, 4) is empty
    train = CocoInstances(str(tmp_path), "train", EvalTransform(48), train=True)
    assert 1 not in train.img_ids and 4 not in train.img_ids
    for image_id in train.img_ids:
        t = train.annotations(image_id)
        for box, mask in zip(t["boxes"], t["masks"]):           # box = tight box of the mask pixels
            ys, xs = np.nonzero(mask)
            np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert not build_fmnist_coco(str(tmp_path), num_train=6, num_val=4, canvas=48, empty_every=3, seed=1)["built"]
    with pytest.raises(ValueError, match="already holds"):
        build_fmnist_coco(str(tmp_path), num_train=7, num_val=4, canvas=48, empty_every=3, seed=1)
