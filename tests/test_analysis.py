"""Analysis tools (evaluation.md §3): each runs in-process on a random-init ViT-Tiny/8 at 32 px and a
handful of Fashion-MNIST images, and writes images of the expected sizes and counts."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models
from ibot.viz.drawing import mass_threshold_mask
from ibot.models.wrapper import MultiCropWrapper

pytestmark = [pytest.mark.filterwarnings(f"error::{w}:(analysis|ibot)")
              for w in ("DeprecationWarning", "FutureWarning", "UserWarning")]

COMMON = ["--arch", "vit_tiny", "--patch_size", "8"]


@pytest.fixture(scope="module")
def assets(fmnist_folder, tmp_path_factory):
    """Fashion-MNIST 32-px folder (2 train / 1 val image per class) and checkpoints of a ViT-Tiny/8."""
    root = tmp_path_factory.mktemp("analysis")
    fm = fmnist_folder(2, 1)
    mini = root / "mini"                      # 4 images in 2 classes, for the costlier loops
    for c in sorted(os.listdir(fm / "train"))[:2]:
        os.makedirs(mini / c)
        for f in sorted(os.listdir(fm / "train" / c))[:2]:
            Image.open(fm / "train" / c / f).save(mini / c / f)
    torch.manual_seed(0)
    teacher = MultiCropWrapper(models.vit_tiny(patch_size=8, img_size=32),
                               models.iBOTHead(192, 64, patch_out_dim=64, shared_head=True))
    student = MultiCropWrapper(models.vit_tiny(patch_size=8, img_size=32, masked_im_modeling=True),
                               models.iBOTHead(192, 64, patch_out_dim=64, shared_head=False))
    full = root / "checkpoint.pth"
    torch.save({"teacher": teacher.state_dict(),
                "student": {"module." + k: v for k, v in student.state_dict().items()}, "epoch": 1}, full)
    backbone = root / "backbone.pth"
    torch.save({"state_dict": teacher.backbone.state_dict()}, backbone)
    return {"root": root, "data": fm, "mini": mini, "full": str(full), "backbone": str(backbone), "teacher": teacher,
            "student": student}


def _size(path):
    with Image.open(path) as im:
        return im.size


# --------------------------------------------------------------------------- helpers

def test_mass_threshold_keeps_stated_share():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(4, 3, 50, generator=g) ** 3
    for thr in (0.1, 0.6, 0.9):
        mask = mass_threshold_mask(attn, thr)
        p = attn / attn.sum(-1, keepdim=True)
        kept = (p * mask).sum(-1)
        assert torch.all(kept >= thr - 1e-6)
        # smallest set: dropping the weakest kept entry falls below the threshold
        weakest = torch.where(mask, p, torch.full_like(p, 2)).min(-1).values
        assert torch.all(kept - weakest < thr + 1e-6)
        # the kept entries are the largest ones
        assert torch.all(torch.where(mask, p, torch.full_like(p, 2)).min(-1).values
                         >= torch.where(~mask, p, torch.full_like(p, -1)).max(-1).values)
    assert mass_threshold_mask(attn, 1.0).all()


def test_view_geometry_identity_and_flip():
    from analysis.correspondence.visualize_correspondence import instance_accuracy, view_geometry
    g = torch.tensor([10.0, 20.0, 64.0, 64.0, 0.0])
    overlap, nearest = view_geometry(g, g, 32, 8)
    assert overlap.all() and torch.equal(nearest, torch.arange(16))
    flipped = g.clone()
    flipped[4] = 1.0
    overlap, nearest = view_geometry(g, flipped, 32, 8)
    assert torch.equal(nearest.reshape(4, 4), torch.arange(16).reshape(4, 4).flip(1))
    assert instance_accuracy(nearest, nearest, overlap, 4) == (16, 16)
    far = torch.tensor([200.0, 200.0, 64.0, 64.0, 0.0])
    assert not view_geometry(g, far, 32, 8)[0].any()


def test_shuffle_patches_is_a_tile_permutation():
    from analysis.occlusion.eval import shuffle_patches
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    perm = torch.tensor([3, 2, 1, 0])
    y = shuffle_patches(x, 2, 2, perm)
    assert torch.equal(y[..., :4, :4], x[..., 4:, 4:]) and torch.equal(y[..., 4:, :4], x[..., :4, 4:])
    assert torch.equal(shuffle_patches(x, 2, 2, torch.arange(4)), x)


# --------------------------------------------------------------------------- tools

def test_visualize_attention_folder_and_single(assets, tmp_path):
    from analysis.attention_map.visualize_attention import main
    out = tmp_path / "attn"
    res = main(COMMON + ["--pretrained_weights", assets["full"], "--data_path", str(assets["data"] / "val"),
                         "--image_size", "32", "32", "--output_dir", str(out), "--show_pics", "3",
                         "--batch_size", "2", "--threshold", "0.6"])
    assert len(res["files"]) == 3 and len(set(res["indices"])) == 3
    for f, idx in zip(res["files"], res["indices"]):
        assert os.path.basename(f) == f"idx{idx}_attn.png"
        assert _size(f) == (32 * 5 + 2 * 4, 32)               # input | composite | 3 heads, 2-px gaps
    for name in ("img.png", "attn_color.png", "attn-head0.png", "attn-head2.png"):
        assert _size(out / name) == (32, 32)
    # per-head rows of the last-layer attention sum to 1; the masks keep >= 60 % of the patch mass
    model = models.vit_tiny(patch_size=8, img_size=32)
    attn = model.get_last_selfattention(torch.randn(2, 3, 32, 32))
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 17), atol=1e-5)
    for a, m in zip(res["attention"], res["masks"]):
        a = a.flatten(1)
        share = (a * m.flatten(1)).sum(1) / a.sum(1)
        assert a.shape == (3, 16) and torch.all(share >= 0.6 - 1e-6)
    img = tmp_path / "one.png"
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(img)
    res = main(COMMON + ["--pretrained_weights", assets["backbone"], "--image_path", str(img),
                         "--image_size", "40", "24", "--output_dir", str(out)])
    assert res["files"] == [str(out / "attn.png")] and _size(out / "attn.png") == (24 * 5 + 8, 40)


def test_video_generation_frames_and_video(assets, tmp_path):
    from analysis.attention_map.video_generation import main
    frames = tmp_path / "frames"
    frames.mkdir()
    for k, p in enumerate(sorted((assets["data"] / "val").glob("*/*.png"))[:4]):
        Image.open(p).convert("RGB").save(frames / f"{k:04d}.jpg")
    res = main(COMMON + ["--pretrained_weights", assets["full"], "--input_path", str(frames),
                         "--output_path", str(tmp_path / "out"), "--fps", "4", "--save_masks"])
    assert len(res["frames"]) == 4 and all(_size(f) == (32, 32) for f in res["frames"])
    assert os.path.isfile(res["video"]) and os.path.basename(res["video"]).startswith("video.")
    gif = main(["--input_path", str(tmp_path / "out" / "attention"), "--video_only", "--video_format", "gif",
                "--output_path", str(tmp_path / "v2")])
    with Image.open(gif["video"]) as im:
        assert im.n_frames == 4 and im.size == (32, 32)


@pytest.mark.parametrize("sample_type", ["class", "instance"])
def test_correspondence(assets, tmp_path, sample_type):
    from analysis.correspondence.visualize_correspondence import main
    out = tmp_path / "corr"
    res = main(COMMON + ["--pretrained_weights", assets["backbone"], "--data_path", str(assets["data"] / "train"),
                         "--img_size", "32", "--output_path", str(out), "--topk", "4", "--show_nums", "3",
                         "--sample_type", sample_type])
    assert len(res["files"]) == 3
    for f in res["files"]:
        assert os.path.basename(f).startswith(f"{sample_type}_corresp") and f.endswith("_nh0.png")
        assert _size(f) == (64, 32)
    if sample_type == "instance":
        assert res["accuracy"] is not None and 0.0 <= res["accuracy"] <= 1.0 and res["total"] > 0
    else:
        assert res["accuracy"] is None


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_extract_topk_cluster(assets, tmp_path, key):
    from analysis.extract_pattern.extract_topk_cluster import build_model, get_args_parser, main
    save = tmp_path / "pat"
    argv = COMMON + ["--pretrained_path", assets["full"], "--checkpoint_key", key, "--data_path",
                     str(assets["mini"]), "--save_path", str(save), "--img_size", "32", "--out_dim", "64",
                     "--topk", "4", "--show_pics", "2", "--patch_window", "3", "--batch_size", "8"]
    # prefixes are normalised: the loaded head equals the checkpoint's for teacher and student
    model = build_model(get_args_parser().parse_args(argv))
    ref = assets[key]
    assert torch.equal(model.head.last_layer.parametrizations.weight.original1,
                       ref.head.last_layer.parametrizations.weight.original1)
    assert torch.equal(model.backbone.pos_embed, ref.backbone.pos_embed)
    for kind in (("patch", "cls") if key == "teacher" else ("patch",)):
        res = main(argv + ["--type", kind, "--min_brightness", "0"])
        mem = torch.load(res["memory_file"], weights_only=True)
        bank = mem["memory_bank"]
        assert bank.shape == ((4, 16, 2) if kind == "patch" else (4, 2))
        assert int(mem["num_per_cluster"].sum()) == bank[..., 1].numel()
        assert len(res["files"]) == min(2, int((mem["num_per_cluster"] > 0).sum()))
        cell = 3 * 8 if kind == "patch" else 32
        for f in res["files"]:
            assert os.path.basename(f).startswith(f"c{kind}_crank") and f.endswith("_top4.jpg")
            assert _size(f) == (2 * cell + 2, 2 * cell + 2)
        # the bank agrees with a direct forward of the first image (consistent (image, label, index) order)
        from torchvision import transforms
        from ibot.eval.features import image_folder
        from ibot.viz.drawing import IMAGENET_MEAN, IMAGENET_STD
        tf = transforms.Compose([transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(32), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        ds = image_folder(str(assets["mini"]), tf)
        x = ds[3][0][None]
        with torch.no_grad():
            h = model.head.bottleneck(model.backbone(x, return_all_tokens=True))
            logits = model.head.patch_logits(h[:, 1:])[0] if kind == "patch" else model.head.cls_logits(h[:, 0])[0]
        assert torch.equal(bank[3][..., 1].long(), logits.argmax(-1))
        # a re-run reuses the bank (no model is built)
        if key == "teacher" and kind == "cls":
            mtime = os.path.getmtime(res["memory_file"])
            assert main(argv + ["--type", kind, "--min_brightness", "0"])["clusters"] == res["clusters"]
            assert torch.equal(torch.load(res["memory_file"], weights_only=True)["memory_bank"], bank)
            assert os.path.getmtime(res["memory_file"]) >= mtime


def test_combine_ckpt_and_occlusion(assets, tmp_path):
    from analysis.combine_ckpt import main as combine
    from analysis.imagenet_models import vit_tiny
    from analysis.occlusion.eval import main as occlusion
    lin = {f"{i}.module.linear.{n}": (torch.randn(10, 4 * 192) if n == "weight" else torch.randn(10))
           for i in range(3) for n in ("weight", "bias")}
    torch.save({"epoch": 3, "state_dict": lin, "best_acc": 50.0, "best_acc_hidx": 2}, tmp_path / "lin.pth")
    merged = combine(["--checkpoint_backbone", assets["backbone"], "--checkpoint_linear", str(tmp_path / "lin.pth"),
                      "--output_file", str(tmp_path / "cls.pth")])
    assert merged["epoch"] == 3 and torch.equal(merged["state_dict"]["linear.weight"], lin["2.module.linear.weight"])
    clf = vit_tiny(str(tmp_path / "cls.pth"), patch_size=8, num_classes=None, img_size=32)
    assert torch.equal(clf.backbone.cls_token, assets["teacher"].backbone.cls_token)
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    res = occlusion(["--model_name", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--scale_size", "32",
                     "--pretrained_weights", str(tmp_path / "cls.pth"), "--test_data", str(assets["mini"]),
                     "--batch_size", "4", "--random_drop", "--shuffle", "--shuffle_h", "2", "4",
                     "--shuffle_w", "2", "4", "--output_dir", str(tmp_path / "occ")])
    assert set(res["random_drop"][0]) == set(range(10))
    assert set(res["shuffle"][0]) == {4, 16}
    with open(tmp_path / "occ" / "occlusion_results.json") as f:
        assert "random_drop" in json.load(f)


@pytest.mark.slow
def test_occlusion_saliency(assets, tmp_path):
    from analysis.occlusion.eval import main as occlusion
    lin = {"0.module.linear.weight": torch.randn(10, 4 * 192), "0.module.linear.bias": torch.zeros(10)}
    torch.save({"epoch": 1, "state_dict": lin, "best_acc": 1.0, "best_acc_hidx": 0}, tmp_path / "lin.pth")
    from analysis.combine_ckpt import main as combine
    combine(["--checkpoint_backbone", assets["backbone"], "--checkpoint_linear", str(tmp_path / "lin.pth"),
             "--output_file", str(tmp_path / "cls.pth")])
    res = occlusion(["--model_name", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--scale_size", "32",
                     "--pretrained_weights", str(tmp_path / "cls.pth"), "--test_data", str(assets["data"] / "val"),
                     "--batch_size", "10", "--dino", "--output_dir", str(tmp_path / "occ")])
    for mode in ("drop_foreground", "keep_foreground"):
        r = res["dino"][mode][0]
        assert len(r) == 10 and all(0 <= v["acc"] <= 1 and 0 <= v["info_loss_ratio"] <= 1 for v in r.values())
    assert abs(res["dino"]["keep_foreground"][0][1.0]["info_loss_ratio"]) < 1e-9


def test_part_features():
    from analysis.linear_part.eval import PartFeatures, main
    backbone = models.vit_tiny(patch_size=8, img_size=32, use_mean_pooling=True).eval()
    part = PartFeatures(backbone, topk=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        idx = part.selected(x)
        tokens = backbone(x, return_all_tokens=True)[:, 1:]
        feats = part.get_intermediate_layers(x)[-1][:, 1:].mean(1)
        attn = backbone.get_last_selfattention(x)[:, :, 0, 1:].mean(1)
    assert torch.equal(idx.sort(1).values, attn.topk(3, dim=1).indices.sort(1).values)
    assert torch.allclose(feats, torch.stack([tokens[b, idx[b]].mean(0) for b in range(2)]), atol=1e-5)


@pytest.mark.slow
def test_linear_part_run(assets, tmp_path):
    from analysis.linear_part.eval import main
    res = main(COMMON + ["--pretrained_weights", assets["full"], "--data_path", str(assets["data"]),
                         "--output_dir", str(tmp_path / "lp"), "--epochs", "1", "--batch_size_per_gpu", "10",
                         "--num_workers", "0", "--resize_size", "32", "--crop_size", "32", "--topk", "2"])
    assert res["teacher"]["feature_dim"] == 192 and 0 <= res["teacher"]["best_acc"] <= 100
    ck = torch.load(tmp_path / "lp" / "checkpoint_teacher_linear.pth", weights_only=True)
    assert len(ck["optimizers"]) == 45 and "44.module.linear.weight" in ck["state_dict"]


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_mask_viewer(assets, tmp_path, shape):
    from analysis.mask_viewer.visualize_masks import main
    out = tmp_path / "masks.png"
    res = main(["--data_path", str(assets["data"] / "train"), "--patch_size", "8", "--global_crops_size", "32",
                "--local_crops_number", "1", "--local_crops_size", "16", "--batch_size", "3",
                "--pred_ratio", "0.3", "--pred_shape", shape, "--output_file", str(out)])
    masks = res["masks"]
    assert masks.shape == (3, 2, 4, 4)
    assert res["masked_share"] == pytest.approx(float(masks.mean()))
    assert _size(out) == (2 * 32 + 2, 3 * 32 + 2 * 2)
    if shape == "rand":  # random masking hits the ratio exactly (up to rounding of the cell count)
        assert all(abs(s - 0.3) <= 1 / 16 for s in res["per_crop_share"])
