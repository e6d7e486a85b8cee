"""DAVIS label propagation and the project's J&F: a toy sequence whose features make the answer obvious,
J&F of a shifted square computed by hand, the palette PNGs, and the script end to end."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.eval.davis_metrics import (db_statistics, evaluate_davis, f_measure, jaccard, seg2bmap)
from ibot.eval.video_segmentation import (davis_palette, imwrite_indexed, label_propagation, restrict_neighborhood,
                                          segment_video, target_size)


def test_palette_is_the_davis_voc_colour_map():
    p = davis_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    assert p[:6].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]
    assert p[8].tolist() == [64, 0, 0] and p[255].tolist() == [224, 224, 192]


def test_indexed_png_carries_the_palette(tmp_path):
    lab = np.array([[0, 1], [2, 3]], np.uint8)
    imwrite_indexed(tmp_path / "x.png", lab)
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode == "P"
        assert np.array(im).tolist() == lab.tolist()
        assert np.array(im.getpalette()[:12]).reshape(4, 3).tolist() == davis_palette()[:4].tolist()


def test_target_size_official_rule():
    assert target_size(480, 854) == (480, 832)        # DAVIS 480p
    assert target_size(854, 480) == (832, 480)
    assert target_size(64, 64, 64) == (64, 64)


def test_neighborhood_mask():
    m = restrict_neighborhood(2, 3, 1)
    assert m.shape == (6, 6)
    assert m[0].tolist() == [1, 1, 0, 1, 1, 0]           # patch (0, 0) sees columns 0-1 of both rows


def test_label_propagation_toy_two_frames():
    # 1 x 4 grid; source patch j has feature e_j; in the target the object (labels of source patches 0, 1)
    # has moved: target patch j looks exactly like source patch 3 - j.
    eye = torch.eye(4)
    src_feat, tar_feat = eye, eye.flip(0)
    src_seg = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]).reshape(1, 2, 1, 4)   # bg, object
    out = label_propagation(tar_feat, 1, 4, [src_feat], [src_seg], topk=1)
    assert out.argmax(1).reshape(-1).tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(out.sum(1), torch.ones(1, 1, 4))
    # top-2 with weights exp(1/0.1) and exp(0) for the two kept sources of each target
    out2 = label_propagation(tar_feat, 1, 4, [src_feat], [src_seg], topk=4, temperature=0.1)
    e = np.exp(10.0)
    assert out2[0, 1, 0, 3].item() == pytest.approx((e + 1) / (e + 3))
    # a neighbourhood of 0 patches only lets each target see the source at its own position
    out3 = label_propagation(tar_feat, 1, 4, [src_feat], [src_seg], topk=1, neighborhood=restrict_neighborhood(1, 4, 0))
    assert out3.argmax(1).reshape(-1).tolist() == [1, 1, 0, 0]


class ColourNet(torch.nn.Module):
    """Patch feature = mean colour of the patch (+ [CLS]); enough to track a red square on blue."""

    def __init__(self, patch=8):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.patch_embed = type("P", (), {"patch_size": patch})()

    def get_intermediate_layers(self, x, n=1):
        f = torch.nn.functional.avg_pool2d(x, self.patch_embed.patch_size).flatten(2).transpose(1, 2)
        return [torch.cat([f.mean(1, keepdim=True), f], 1)]


def _square_frames(root, shifts, size=(64, 32)):
    w, h = size
    os.makedirs(root, exist_ok=True)
    paths = []
    for t, s in enumerate(shifts):
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 2] = 200
        img[8:16, 8 + s:16 + s] = (230, 0, 0)
        paths.append(os.path.join(root, f"{t:05d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=100)
    return paths


def test_segment_video_follows_the_square(tmp_path):
    frames = _square_frames(str(tmp_path / "v"), [0, 8])
    ann = np.zeros((32, 64), np.uint8)
    ann[8:16, 8:16] = 1
    imwrite_indexed(tmp_path / "first.png", ann)
    written = segment_video(ColourNet(), frames, str(tmp_path / "first.png"), str(tmp_path / "out"), 8,
                            scale_size=32)
    assert [os.path.basename(p) for p in written] == ["00000.png", "00001.png"]
    with Image.open(written[0]) as im0, Image.open(written[1]) as im1:
        assert im0.mode == im1.mode == "P"
        assert np.array(im0).tolist() == ann.tolist()
        m = np.array(im1)
    assert (m[10:14, 18:22] == 1).all()          # centre of the moved square
    assert (m[8:16, 8:16] == 0).all()            # where it was
    assert (m[:, :16] == 0).all() and (m[:, 24:] == 0).all() and (m[:8] == 0).all() and (m[16:] == 0).all()


def test_boundary_map_of_a_square_is_its_outer_perimeter():
    seg = np.zeros((40, 40), bool)
    seg[10:20, 10:20] = True
    b = seg2bmap(seg)
    ring = np.zeros_like(seg)
    ring[9:20, 9:20] = True
    ring[10:19, 10:19] = False
    assert b.sum() == 40 and (b == ring).all()


def test_jf_of_a_shifted_square_hand_computed():
    # gt square rows/cols 10..19 of a 40 x 40 frame; result shifted 2 px right.
    # J = 80 / 120. Boundaries: 40-px perimeters; tolerance ceil(0.008 * 40 * sqrt 2) = 1 px (a plus-shaped
    # disk); 22 of the 40 pixels of each boundary lie within 1 px of the other -> P = R = F = 0.55.
    gt = np.zeros((40, 40), bool)
    gt[10:20, 10:20] = True
    res = np.roll(gt, 2, axis=1)
    assert jaccard(gt, res) == pytest.approx(2 / 3)
    assert f_measure(res, gt) == pytest.approx(0.55)
    assert jaccard(np.zeros_like(gt), np.zeros_like(gt)) == 1.0 and f_measure(gt, np.zeros_like(gt)) == 0.0
    void = np.zeros_like(gt)
    void[10:20, 20:22] = True                   # the 20 extra result pixels are void: excluded only on request
    assert jaccard(gt, gt | np.roll(gt, 2, axis=1), void) == 1.0
    assert jaccard(gt, gt | np.roll(gt, 2, axis=1)) == pytest.approx(100 / 120)
    # 4 evaluated frames with J = 1, 1, 2/3, 2/3: bins [0:2] and [2:4] -> decay 1/3; recall 1
    assert db_statistics([1, 1, 2 / 3, 2 / 3]) == pytest.approx((5 / 6, 1.0, 1 / 3))
    assert db_statistics([0.9, 0.2, 0.3, 0.1])[1] == pytest.approx(0.25)


def test_evaluate_davis_on_folders(tmp_path):
    # 6 frames, the first and the last are not scored; result = gt except frames 3, 4 shifted by 2 px;
    # object 2 is perfect everywhere.
    gt_dir, res_dir = tmp_path / "DAVIS" / "Annotations" / "480p" / "sq", tmp_path / "res" / "sq"
    for t in range(6):
        gt = np.zeros((40, 40), np.uint8)
        gt[10:20, 10:20] = 1
        gt[30:35, 30:35] = 2
        res = gt.copy()
        if t in (3, 4):
            res[10:20, 10:22] = 0
            res[10:20, 12:22] = 1
        imwrite_indexed(gt_dir / f"{t:05d}.png", gt)
        imwrite_indexed(res_dir / f"{t:05d}.png", res)
    out = evaluate_davis(str(tmp_path / "DAVIS"), str(tmp_path / "res"), ["sq"])
    assert out["per_object"]["sq_1"]["J-Mean"] == pytest.approx(5 / 6)
    assert out["per_object"]["sq_1"]["F-Mean"] == pytest.approx((1 + 1 + 0.55 + 0.55) / 4)
    assert out["J-Mean"] == pytest.approx((5 / 6 + 1) / 2) and out["J-Decay"] == pytest.approx(1 / 6)
    assert out["F-Mean"] == pytest.approx((0.775 + 1) / 2)
    assert out["J&F-Mean"] == pytest.approx((out["J-Mean"] + out["F-Mean"]) / 2)


def test_video_script_end_to_end(tmp_path, capsys):
    from evaluation.eval_video_segmentation import main
    from ibot.data.fmnist_toolbox import build_davis
    from ibot.eval.features import build_backbone
    torch.set_num_threads(1)
    data = tmp_path / "DAVIS"
    labels = build_davis(str(data), n_frames=4)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"teacher": build_backbone("vit_tiny", 8).state_dict()}, ckpt)
    out_dir = tmp_path / "viseg"
    res = main(["--arch", "vit_tiny", "--patch_size", "8", "--pretrained_weights", str(ckpt), "--data_path",
                str(data), "--output_dir", str(out_dir), "--scale_size", "64", "--use_cuda", "false"])
    pngs = sorted(os.listdir(out_dir / "fmnist"))
    assert pngs == [f"{t:05d}.png" for t in range(4)]
    with Image.open(out_dir / "fmnist" / "00002.png") as im:
        assert im.mode == "P" and im.size == (96, 64)
        assert np.array(im.getpalette()[:9]).reshape(3, 3).tolist() == davis_palette()[:3].tolist()
    assert 0.0 <= res["J&F-Mean"] <= 1.0 and set(res["per_object"]) == {"fmnist_1", "fmnist_2"}
    assert (out_dir / "davis_results.json").is_file()
    assert "J&F-Mean" in capsys.readouterr().out
    assert labels.shape == (4, 64, 96)
    with pytest.raises(FileNotFoundError, match="ImageSets/2017/val.txt"):
        main(["--data_path", str(tmp_path / "nowhere")])


def test_run_sh_copydays_and_davis_dispatch(tmp_path):
    """run.sh TYPEs copydays_copydet and davis_viseg launch their scripts with the official defaults, per key,
    on the CPU with --use_cuda false and the extra flags last (dry run: PYTHON=echo)."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON="echo", OUTPUT_DIR=str(tmp_path), PRETRAINED="ck.pth")
    out = subprocess.run(["bash", os.path.join(repo, "run.sh"), "copydays_copydet+davis_viseg", "j", "vit_small",
                          "teacher,student", "0", "--extra", "1"], env=env, capture_output=True, text=True,
                         check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("evaluation/")]
    assert len(lines) == 4
    for key, (copy, davis) in zip(("teacher", "student"), (lines[:2], lines[2:])):
        assert copy == (f"evaluation/eval_copy_detection.py --arch vit_small --pretrained_weights ck.pth "
                        f"--checkpoint_key {key} --data_path data/copydays --output_dir {tmp_path}/copydays "
                        f"--use_cuda false --extra 1")
        assert davis == (f"evaluation/eval_video_segmentation.py --arch vit_small --pretrained_weights ck.pth "
                         f"--checkpoint_key {key} --data_path data/davis/DAVIS --output_dir {tmp_path}/viseg/{key} "
                         f"--use_cuda false --extra 1")
