"""ibot.segmentation: mIoU, sliding-window inference, pipelines, presets, heads and data errors."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from ibot.segmentation import transforms as T
from ibot.segmentation.dataset import ADE20KDataset, IterationSampler, SegmentationDataError, reduce_zero_label
from ibot.segmentation.heads import FCNHead, UPerHead, linear_head
from ibot.segmentation.metrics import IoUAccumulator
from ibot.segmentation.presets import PRESETS, get_preset, scaled_to_crop
from ibot.segmentation.schedule import poly_warmup_lr
from ibot.segmentation.segmentor import segmentation_loss, slide_logits, window_grid

I = 255  # ignore


# ----------------------------------------------------------------------------- mIoU
def test_miou_accumulates_areas_over_the_set():
    # 4 classes: 0 and 1 everywhere, 2 absent from image B, 3 absent from everything (and never predicted)
    gt_a = np.array([[0, 0, 1, 1], [0, 2, 2, I]])
    pr_a = np.array([[0, 1, 1, 1], [0, 2, 0, 3]])  # the last pixel is ignored whatever is predicted
    gt_b = np.array([[1, 1, 1, 0], [0, 0, I, I]])
    pr_b = np.array([[1, 1, 0, 0], [0, 2, 1, 1]])
    acc = IoUAccumulator(4)
    acc.update(torch.tensor(pr_a), torch.tensor(gt_a))
    acc.update(torch.tensor(pr_b), torch.tensor(gt_b))
    m = acc.summary()
    # by hand, over the 13 labelled pixels of both images:
    # class 0: gt {a00,a01,a10,b03,b10,b11}=6, pred {a00,a10,a12,b02,b03,b10}=6, inter {a00,a10,b03,b10}=4
    # class 1: gt {a02,a03,b00,b01,b02}=5, pred {a01,a02,a03,b00,b01}=5, inter {a02,a03,b00,b01}=4
    # class 2: gt {a11,a12}=2, pred {a11,b11}=2, inter {a11}=1
    # class 3: nothing -> NaN, left out of the mean
    iou = [4 / (6 + 6 - 4), 4 / (5 + 5 - 4), 1 / (2 + 2 - 1)]
    assert m["IoU"][:3] == pytest.approx([100 * v for v in iou])
    assert math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert m["aAcc"] == pytest.approx(100 * 9 / 13)
    assert m["mAcc"] == pytest.approx(100 * (4 / 6 + 4 / 5 + 1 / 2) / 3)
    # not the mean of per-image mIoUs
    per_image = []
    for pr, gt in ((pr_a, gt_a), (pr_b, gt_b)):
        one = IoUAccumulator(4)
        one.update(torch.tensor(pr), torch.tensor(gt))
        per_image.append(one.summary()["mIoU"])
    assert abs(np.mean(per_image) - m["mIoU"]) > 1


def test_miou_class_predicted_but_absent_counts_zero():
    acc = IoUAccumulator(3)
    acc.update(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 0, 0]))  # class 2 predicted, never true
    m = acc.summary()
    assert m["IoU"][0] == pytest.approx(50.0) and m["IoU"][2] == 0.0 and math.isnan(m["IoU"][1])
    assert m["mIoU"] == pytest.approx(25.0)


# ----------------------------------------------------------------------------- sliding window
def test_window_grid_official_positions():
    # mmseg: ceil((683 - 512) / 341) + 1 = 2 columns, the last one aligned with the border
    assert window_grid(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert window_grid(100, 90, 64, 42) == [(0, 64, 0, 64), (0, 64, 26, 90), (36, 100, 0, 64), (36, 100, 26, 90)]
    assert window_grid(50, 60, 64, 42) == [(0, 50, 0, 60)]  # smaller than the window: one, the whole image


def test_slide_inference_reproduces_coordinates_and_averages_overlaps():
    height, width, crop, stride = 100, 90, 64, 42
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    img = torch.stack([ys, xs, torch.zeros_like(ys)])[None]  # channels hold the pixel coordinates
    out = slide_logits(lambda window: window, img, crop, stride, num_classes=3)
    assert torch.equal(out[0, 0], ys) and torch.equal(out[0, 1], xs)  # exactly, borders included

    # a model answering with its window's left edge: overlapped pixels get the mean of the windows
    def left_edge(window):
        return torch.full((1, 1) + tuple(window.shape[-2:]), float(window[0, 1, 0, 0]))

    out = slide_logits(left_edge, img, crop, stride, num_classes=1)[0, 0]
    assert out[0, 0] == 0 and out[0, 89] == 26          # one window each
    assert out[0, 30] == pytest.approx((0 + 26) / 2)    # columns 26..63 are covered by both windows
    assert out[99, 40] == pytest.approx(13.0)


# ----------------------------------------------------------------------------- pipelines
def test_rescale_size_and_test_scales():
    assert T.rescale_size(300, 400, (2048, 512)) == (512, 683)     # short side to 512
    assert T.rescale_size(100, 1000, (2048, 512)) == (205, 2048)   # long side capped at 2048
    # _ms: SETR short side max(512, int(512 r)), single scale otherwise
    sizes = T.test_scales(300, 400, (2048, 512), (0.5, 1.0, 1.5), setr_resize=True, crop_size=512)
    assert sizes == [(512, 683), (512, 683), (768, 1024)]
    assert T.test_scales(300, 400, (256, 64)) == [(64, 85)]


def test_random_crop_cat_max_ratio():
    label = np.zeros((40, 40), np.uint8)
    label[:, 30:] = 1  # class 1 only in the right quarter
    img = np.zeros((40, 40, 3), np.uint8)
    rng = np.random.default_rng(0)
    # with cat_max_ratio the accepted crops reach the minority class far more often than uniform crops
    hits = [np.any(T.random_crop(img, label, (20, 20), 0.75, rng)[1] == 1) for _ in range(200)]
    uniform = [np.any(T.random_crop(img, label, (20, 20), 1.0, rng)[1] == 1) for _ in range(200)]
    assert np.mean(hits) > np.mean(uniform) + 0.2


def test_train_pipeline_pads_with_ignore_and_is_seeded():
    img = np.random.default_rng(1).integers(0, 255, (30, 50, 3)).astype(np.uint8)
    label = np.full((30, 50), 3, np.uint8)
    pipe = T.TrainPipeline(64, (256, 64), ratio_range=(0.5, 0.5))  # 0.5 x (256, 64): short side 32 < crop
    image, lab = pipe(img, label, np.random.default_rng(7))
    assert image.shape == (3, 64, 64) and lab.shape == (64, 64) and lab.dtype == torch.int64
    assert (lab[32:] == I).all() and (lab[:32, :53] == 3).all()          # 32 x 53 content, rest padded
    assert (image[:, 32:] == 0).all()
    again, lab2 = pipe(img, label, np.random.default_rng(7))
    assert torch.equal(image, again) and torch.equal(lab, lab2)


def test_photometric_distortion_hsv_round_trip_and_range():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    back = T._hsv8_to_rgb(T._rgb_to_hsv8(img))
    assert np.abs(back.astype(int) - img).max() <= 4  # 8-bit HSV quantisation
    out = T.photometric_distortion(img, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.shape == img.shape


def test_reduce_zero_label_and_sampler_positions():
    assert reduce_zero_label(np.array([0, 1, 2, 150], np.uint8)).tolist() == [255, 0, 1, 149]
    full = list(IterationSampler(10, 2, 6, seed=3))
    resumed = list(IterationSampler(10, 2, 6, start_iter=2, seed=3))
    assert resumed == full[4:]
    ranks = [list(IterationSampler(10, 2, 3, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(i for r in ranks for i, _ in r[:4]) == sorted(set(i for r in ranks for i, _ in r[:4]))


# ----------------------------------------------------------------------------- presets and schedule
def test_presets_parsed_values():
    assert len(PRESETS) == 20
    p = get_preset("upernet/vit_base_512")
    assert (p.lr, p.layer_decay_rate, p.channels, p.test_stride, p.max_iters, p.warmup_iters) == \
        (7e-4, 0.65, 768, 341, 160000, 1500)
    assert (p.aux_in_index, p.aux_channels, p.aux_loss_weight, p.pool_scales, p.dropout_ratio) == \
        (2, 256, 0.4, (1, 2, 3, 6), 0.1)
    assert get_preset("upernet/vit_small_512_ade20k_160k_ms.py").test_ratios == T_RATIOS  # config file name
    s = get_preset("upernet/vit_small_512")
    assert (s.lr, s.layer_decay_rate, s.drop_path_rate, s.batch_size_per_gpu) == (3e-5, 0.9, 0.1, 2)
    lin = get_preset("linear/vit_base_512")
    assert (lin.lr, lin.layer_decay_rate, lin.frozen_stages, lin.with_fpn, lin.dropout_ratio) == (7e-4, None, 12, False, 0.0)
    big = get_preset("upernet/vit_large_640")
    assert (big.max_iters, big.update_interval, big.batch_size_per_gpu, big.warmup_iters, big.out_indices,
            big.test_stride, big.train_scale, big.lr, big.layer_decay_rate, big.drop_path_rate) == \
        (320000, 2, 1, 3000, (7, 11, 15, 23), 426, (2560, 640), 2e-5, 0.95, 0.2)
    ms = get_preset("upernet/vit_base_512_ms")
    assert (ms.test_flip, ms.setr_resize, ms.batch_size_per_gpu, ms.fp16, ms.lr) == (True, True, 4, False, 3e-5)
    assert get_preset("upernet/vit_base_640_ms").batch_size_per_gpu == 2
    assert get_preset("upernet/vit_base_512_pt2ft").lr == 3e-5
    assert get_preset("linear/vit_base_640").lr == 3e-5
    small = scaled_to_crop(p, 64)
    assert (small.crop_size, small.train_scale, small.eval_scale, small.test_stride) == (64, (256, 64), (256, 64), 42)
    with pytest.raises(KeyError, match="choices"):
        get_preset("upernet/vit_small_640")


T_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_poly_schedule_with_linear_warmup():
    # mmcv: warm-up factor 1 - (1 - i / W)(1 - ratio) on top of the poly value
    assert poly_warmup_lr(1.0, 0, 100, warmup_iters=10, warmup_ratio=1e-6) == pytest.approx(1e-6)
    assert poly_warmup_lr(1.0, 5, 100, warmup_iters=10) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_warmup_lr(1.0, 10, 100, warmup_iters=10) == pytest.approx(0.9)
    assert poly_warmup_lr(2.0, 75, 100, power=1.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- heads and loss
def test_heads_shapes_names_and_init():
    torch.manual_seed(0)
    maps = tuple(torch.randn(2, 16, 32 // s, 32 // s) for s in (1, 2, 4, 8))
    upernet = UPerHead([16] * 4, 8, 5)
    assert upernet(maps).shape == (2, 5, 32, 32)
    names = set(upernet.state_dict())
    for key in ("psp_modules.3.1.conv.weight", "bottleneck.bn.running_mean", "lateral_convs.2.conv.weight",
                "fpn_convs.0.bn.weight", "fpn_bottleneck.conv.weight", "conv_seg.bias"):
        assert key in names
    assert upernet.psp_modules[0][1].conv.bias is None
    assert upernet.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.3)
    aux = FCNHead(16, 12, 5, num_convs=1, in_index=2)
    assert aux(maps).shape == (2, 5, 8, 8) and "convs.0.conv.weight" in aux.state_dict()
    same = tuple(torch.randn(2, 16, 4, 4) for _ in range(4))
    lin = linear_head(16, 5)
    assert lin(same).shape == (2, 5, 4, 4) and set(lin.state_dict()) == {"conv_seg.weight", "conv_seg.bias"}
    with pytest.raises(ValueError, match="channels == in_channels"):
        FCNHead(64, 32, 5, num_convs=0, in_index=(0, 1, 2, 3))


def test_loss_averages_over_all_pixels_as_mmseg_0_12():
    logits = torch.zeros(1, 2, 2, 2)
    label = torch.tensor([[[0, 1], [I, I]]])
    # two labelled pixels with loss ln 2 each, divided by the 4 pixels
    assert segmentation_loss(logits, label).item() == pytest.approx(2 * math.log(2) / 4)
    assert segmentation_loss(logits, label, avg_non_ignore=True).item() == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- data errors
def _write_ade(root, labels_train, labels_val, size=(16, 16)):
    for folder, labels in (("training", labels_train), ("validation", labels_val)):
        os.makedirs(os.path.join(root, "images", folder))
        os.makedirs(os.path.join(root, "annotations", folder))
        for i, value in enumerate(labels):
            Image.fromarray(np.zeros(size + (3,), np.uint8)).save(os.path.join(root, "images", folder, f"{i}.jpg"))
            Image.fromarray(np.full(size, value, np.uint8)).save(os.path.join(root, "annotations", folder, f"{i}.png"))


def test_clear_data_errors(tmp_path):
    with pytest.raises(SegmentationDataError, match=r"ADEChallengeData2016/images/\{training,validation\}"):
        ADE20KDataset(str(tmp_path), "train")
    root = tmp_path / "ADEChallengeData2016"
    _write_ade(str(root), [1, 12], [3])
    ds = ADE20KDataset(str(tmp_path), "train", num_classes=11)   # the parent folder works too
    assert ds.load_label(0).max() == 0
    with pytest.raises(SegmentationDataError, match=r"1.png: label values \[12\] outside the 11 classes"):
        ds.check_labels()
    assert ADE20KDataset(str(root), "val", num_classes=11).check_labels() == 1


def test_predict_multiscale_flip_maps_back_to_the_image():
    """A 'model' whose class-1 logit is the normalised brightness: bright pixels are class 1 at every
    scale, and flipped passes are flipped back before averaging (else the halves would swap)."""
    from ibot.segmentation.segmentor import predict

    class Brightness(nn.Module):
        num_classes = 2

        def forward(self, x):
            return torch.cat([-x[:, :1], x[:, :1]], dim=1)

    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 40:] = 255  # right third bright
    base = scaled_to_crop(get_preset("upernet/vit_small_512"), 32)
    ms = scaled_to_crop(get_preset("upernet/vit_small_512_ms"), 32)  # 6 ratios x flip
    for preset in (base, ms):
        for mode in ("slide", "whole"):
            pred = predict(Brightness(), img, preset, torch.device("cpu"), mode=mode)
            assert pred.shape == (40, 60)
            assert (pred[:, 42:] == 1).all() and (pred[:, :38] == 0).all(), (preset.name, mode)
