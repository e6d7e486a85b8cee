"""Detection: target assignment, box coding, losses and test-time rules against hand-computed values."""
import math

import pytest
import torch
import torch.nn as nn

from ibot.detection.assign import IGNORED, NEGATIVE, inside_flags, max_iou_assign, sample_pos_neg
from ibot.detection.cascade import (OFFICIAL_STAGE_IOUS, OFFICIAL_STAGE_STDS, OFFICIAL_STAGE_WEIGHTS,
                                    CascadeRoIHeads, mask_targets, stage_box_coder)
from ibot.detection.heads import AlignedMultiScaleRoIAlign
from ibot.detection.rpn import MMDetAnchorGenerator
from ibot.detection.trainer import lr_factor


def _heads(num_classes=2, **kw):
    torch.manual_seed(0)
    return CascadeRoIHeads(num_classes, in_channels=8, conv_channels=8, fc_channels=16, mask_channels=8, **kw)


def test_official_stage_settings():
    assert OFFICIAL_STAGE_IOUS == (0.5, 0.6, 0.7)
    assert OFFICIAL_STAGE_WEIGHTS == (1.0, 0.5, 0.25)
    assert OFFICIAL_STAGE_STDS == ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


@pytest.mark.parametrize("stage, expected", [(0, (1.0, 2.0, 0.0, math.log(1.2) / 0.2)),
                                             (1, (2.0, 4.0, 0.0, math.log(1.2) / 0.1)),
                                             (2, (0.1 / 0.033, 0.2 / 0.033, 0.0, math.log(1.2) / 0.067))])
def test_stage_box_coding(stage, expected):
    # roi centre (5, 5) size 10x10; gt centre (6, 7) size 10x12: dx = 0.1, dy = 0.2, dw = 0, dh = log 1.2
    roi = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 13.0]])
    coder = stage_box_coder(OFFICIAL_STAGE_STDS[stage])
    deltas = coder.encode_single(gt, roi)
    torch.testing.assert_close(deltas, torch.tensor([expected]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coder.decode_single(deltas, roi), gt, rtol=1e-5, atol=1e-4)


def test_max_iou_assign_thresholds_and_low_quality():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # IoUs with gt: 1.0, 0.5, 0.35, 0.2, 0
    props = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 3.5], [0, 0, 10, 2], [20, 20, 30, 30]],
                         dtype=torch.float32)
    assigned, iou = max_iou_assign(props, gt, 0.7, 0.3, 0.3, True)
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.5, 0.35, 0.2, 0.0]))
    assert assigned.tolist() == [0, IGNORED, IGNORED, NEGATIVE, NEGATIVE]
    # only the weak proposals: the best (0.35 >= min_pos_iou 0.3) becomes positive, 0.2 would not
    assigned, _ = max_iou_assign(props[2:], gt, 0.7, 0.3, 0.3, True)
    assert assigned.tolist() == [0, NEGATIVE, NEGATIVE]
    assigned, _ = max_iou_assign(props[3:], gt, 0.7, 0.3, 0.3, True)
    assert assigned.tolist() == [NEGATIVE, NEGATIVE]
    # no ground truth: everything is background
    assigned, iou = max_iou_assign(props, gt[:0], 0.7, 0.3, 0.3, True)
    assert assigned.tolist() == [NEGATIVE] * 5 and iou.tolist() == [0.0] * 5


def test_sampler_caps_positives_and_fills_with_negatives():
    assigned = torch.tensor([0, 0, 0, 0, 0, NEGATIVE, NEGATIVE, NEGATIVE, IGNORED])
    pos, neg = sample_pos_neg(assigned, num=4, pos_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert pos.numel() == 1 and neg.numel() == 3 and set(neg.tolist()) == {5, 6, 7}
    pos, neg = sample_pos_neg(assigned, num=16, pos_fraction=0.25)
    assert pos.numel() == 4 and neg.numel() == 3


def test_rpn_border_rule_and_unrounded_anchors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-1.0, 0.0, 9.0, 10.0], [0.0, 0.0, 12.0, 10.0]])
    assert inside_flags(anchors, 11, 12, 0).tolist() == [True, False, False]   # mmdet: x2 < W, y2 < H
    assert not inside_flags(anchors[:1], 10, 12, 0).item()
    assert inside_flags(anchors, 11, 12, -1).tolist() == [True, True, True]
    gen = MMDetAnchorGenerator(((32.0,),), ((0.5, 1.0, 2.0),), (4,))
    w = 32 / math.sqrt(0.5) / 2   # ratio 0.5: w = 32 * sqrt(2), h = 32 / sqrt(2) -> half 22.627 / 11.314
    torch.testing.assert_close(gen.cell_anchors[0][0], torch.tensor([-w, -w / 2, w, w / 2]))


def test_rpn_losses_are_zero_when_no_anchor_is_labelled():
    """A 16-px image: every 16-px anchor of the one stride-8 level crosses the border (mmdet: x2 < W),
    so nothing is sampled; mmdet's losses are then 0 (sum / (avg_factor + eps)), torchvision's own
    division by the sample count gives NaN. One pixel more and the centre anchor is sampled."""
    from torchvision.models.detection.image_list import ImageList
    from ibot.detection.rpn import build_rpn
    torch.manual_seed(0)
    rpn = build_rpn(4, anchor_scale=2.0, ratios=(0.5, 1.0, 2.0), strides=(8,), train_pre_nms=10,
                    train_post_nms=10)
    rpn.train()
    feats = {"0": torch.randn(1, 4, 2, 2, requires_grad=True)}
    images = ImageList(torch.zeros(1, 3, 16, 16), [(16, 16)])
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 12.0, 13.0]]), "image_size": torch.tensor([16, 16])}]
    anchors = rpn.anchor_generator(images, list(feats.values()))
    labels, _ = rpn.assign_targets_to_anchors(anchors, targets)
    assert (labels[0] == -1).all()
    _, losses = rpn(images, feats, targets)
    assert losses["loss_objectness"].item() == 0.0 and losses["loss_rpn_box_reg"].item() == 0.0
    (losses["loss_objectness"] + losses["loss_rpn_box_reg"]).backward()
    assert torch.equal(feats["0"].grad, torch.zeros_like(feats["0"]))
    images = ImageList(torch.zeros(1, 3, 24, 24), [(17, 17)])
    targets[0]["image_size"] = torch.tensor([17, 17])                  # [0, 0, 16, 16] is inside now
    _, losses = rpn(images, feats, targets)
    assert losses["loss_objectness"].item() > 0


def test_stage_sampling_uses_the_stage_iou():
    heads = _heads(num_classes=4, num_samples=16, pos_fraction=1.0)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    labels = torch.tensor([3])
    # IoUs 1.0, 0.8, 0.65, 0.55, 0.4, 0.0
    props = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6.5], [0, 0, 10, 5.5], [0, 0, 10, 4],
                          [20, 20, 30, 30]], dtype=torch.float32)
    for stage, num_pos in ((0, 5), (1, 4), (2, 3)):     # gt added as a proposal + 4 / 3 / 2 proposals
        t = heads.sample(stage, props, gt, labels)
        assert t.num_pos == num_pos
        assert t.labels.tolist() == [3] * num_pos + [4] * (7 - num_pos)
        assert t.gt_index[:num_pos].tolist() == [0] * num_pos
        assert t.is_gt.sum().item() == 1 and t.is_gt[:num_pos].any()


@pytest.mark.parametrize("stage", [0, 2])
def test_box_loss_is_giou_on_class_specific_decoded_boxes(stage):
    heads = _heads(num_classes=2)
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    t = heads.sample(stage, torch.tensor([[30.0, 30.0, 40.0, 40.0]]), gt[0], torch.tensor([1]))
    assert t.num_pos == 1 and t.labels.tolist() == [1, 2]     # the gt box (positive) + one negative
    deltas = torch.zeros(2, 8)
    deltas[0, 4:] = torch.tensor([1.0, 0.0, 0.0, 0.0])          # class 1: dx = 1 (in std units)
    deltas[0, :4] = torch.tensor([5.0, 5.0, 0.0, 0.0])          # class 0: must not be used
    logits = torch.zeros(2, 3)
    losses = heads.box_loss(stage, logits, deltas, [t], gt)
    shift = OFFICIAL_STAGE_STDS[stage][0] * 10                  # pixels
    giou = (10 - shift) / (10 + shift)                          # IoU = GIoU here (enclosing box = union)
    expected = 10 * (1 - giou) / 2                              # weight 10, averaged over the 2 sampled RoIs
    assert losses["loss_bbox"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["loss_cls"].item() == pytest.approx(math.log(3), rel=1e-6)


def test_refine_drops_gt_regresses_by_predicted_class_and_clips():
    heads = _heads(num_classes=2, num_samples=8, pos_fraction=0.5)
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    t = heads.sample(0, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), gt, torch.tensor([0]))
    assert t.labels.tolist() == [0, 2] and t.is_gt.tolist() == [True, False]
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 5.0, 1.0]])   # background RoI: foreground argmax = class 1
    deltas = torch.zeros(2, 8)
    deltas[1, 4] = 1.0                                           # class 1 of the second RoI: dx = 0.1 * 4 px
    deltas[1, 0] = -3.0                                          # class 0: ignored
    refined = heads.refine(0, [t], logits, deltas, [(6, 6)])
    assert len(refined) == 1 and refined[0].shape == (1, 4)
    torch.testing.assert_close(refined[0], torch.tensor([[2.4, 2.0, 6.0, 6.0]]))  # x2 6.4 clipped to 6


class _ConstHead(nn.Module):
    def __init__(self, logits, num_classes):
        super().__init__()
        self.logits, self.num_classes = torch.tensor(logits), num_classes

    def forward(self, x):
        n = x.shape[0]
        return self.logits.expand(n, -1), torch.zeros(n, 4 * self.num_classes)


def test_test_scores_average_stage_logits_then_softmax():
    heads = _heads(num_classes=2, score_thr=0.0)
    heads.with_mask = False
    stage_logits = [[4.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]
    heads.box_heads = nn.ModuleList(_ConstHead(lg, 2) for lg in stage_logits)
    heads.eval()
    feats = {str(i): torch.zeros(1, 8, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)}
    out = heads(feats, [torch.tensor([[1.0, 1.0, 9.0, 9.0]])], [(64, 64)])[0]
    expected = torch.tensor(stage_logits).mean(0).softmax(0)           # softmax of the mean logit
    got = {int(lab): float(s) for lab, s in zip(out["labels"], out["scores"])}
    assert got[0] == pytest.approx(expected[0].item(), rel=1e-6)
    assert got[1] == pytest.approx(expected[1].item(), rel=1e-6)
    torch.testing.assert_close(out["boxes"], torch.tensor([[1.0, 1.0, 9.0, 9.0]] * 2))


def test_multiclass_nms_threshold_and_cap():
    heads = _heads(num_classes=2, max_dets=2)
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([[0.9, 0.02, 0.08], [0.8, 0.6, 0.0], [0.04, 0.3, 0.66]])  # last column = background
    out = heads.postprocess_boxes(rois, scores, torch.zeros(3, 8), (100, 100))
    # class 0: 0.9 suppresses 0.8 (IoU 0.82 > 0.5), 0.04 < 0.05; class 1: 0.6 and 0.3; cap 2
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert out["labels"].tolist() == [0, 1]


def test_mask_targets_crop_resize_binarise():
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[0, :, :4] = 1                                           # left half
    target = mask_targets(mask, torch.tensor([0]), torch.tensor([[0.0, 0.0, 8.0, 8.0]]), 28)
    assert target.shape == (1, 28, 28)
    assert target[0, :, :14].min() == 1 and target[0, :, 14:].max() == 0
    right = mask_targets(mask, torch.tensor([0]), torch.tensor([[4.0, 0.0, 8.0, 8.0]]), 28)
    assert right.sum() == 0


def test_roi_levels_follow_finest_scale_56_and_sampling_is_aligned():
    pool = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)
    ramp = torch.arange(256, dtype=torch.float32).repeat(256, 1)      # value = column index
    feats = {str(i): ramp[None, None, :256 // 2 ** i, :256 // 2 ** i].contiguous() for i in range(4)}
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [0, 0, 150, 150], [0, 0, 300, 300], [0, 0, 500, 500]])]
    out = pool(feats, boxes, [(1024, 1024)])
    assert pool.map_levels(boxes).tolist() == [0, 1, 2, 3]           # sqrt(area) < 112, < 224, < 448, >= 448
    # box (0, 0, 32, 32) on the stride-4 map = (0, 0, 8, 8); aligned bin 3 averages around x = 3.5 (4.0 unaligned)
    assert out[0, 0, 3, 3].item() == pytest.approx(3.5, abs=1e-5)


def test_lr_schedule_warmup_and_steps():
    assert lr_factor(0, [800, 1100], 500, 0.001) == pytest.approx(0.001)
    assert lr_factor(250, [800, 1100], 500, 0.001) == pytest.approx(1 - 0.5 * 0.999)
    assert lr_factor(500, [800, 1100], 500, 0.001) == 1.0
    assert lr_factor(800, [800, 1100], 500, 0.001) == pytest.approx(0.1)
    assert lr_factor(1100, [800, 1100], 500, 0.001) == pytest.approx(0.01)
