"""Data pipeline: ImageFolderMask / ImageFolderInstance, augmentations, Fashion-MNIST converter."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision import transforms

import loader
from ibot.data.augment import DataAugmentationiBOT, GaussianBlur, Solarization, color_jitter
from ibot.data.folders import BadImageError, ImageFolderInstance, ImageFolderMask, rgb_loader
from ibot.data.fmnist import CLASS_DIRS, DEFAULT_SRC, build_fmnist_folder, load_split
from repo_files import load_repo_file

MASK_KW = dict(patch_size=4, pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2],
               pred_aspect_ratio=(0.3, 1 / 0.3), pred_shape="block")


def _rand_image(rng, size=(40, 36), mode="RGB"):
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture
def class_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            _rand_image(rng).save(root / c / f"{i}.png")
    return root


def _aug(ng=2, nl=2):
    return DataAugmentationiBOT((0.4, 1.0), (0.05, 0.4), ng, nl, global_crops_size=32,
                                local_crops_size=16)


def test_loader_reexports():
    assert loader.ImageFolderMask is ImageFolderMask
    assert loader.ImageFolderInstance is ImageFolderInstance


def test_augmentation_shapes_and_order():
    torch.manual_seed(0)
    img = _rand_image(np.random.default_rng(1), (50, 40))
    crops = _aug(2, 3)(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    crops = _aug(4, 0)(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 4
    aug = DataAugmentationiBOT((0.14, 1.0), (0.05, 0.4), 2, 10)
    crops = aug(_rand_image(np.random.default_rng(1), (256, 240)))
    assert [c.shape[-1] for c in crops] == [224] * 2 + [96] * 10


def test_blur_and_solarization():
    img = _rand_image(np.random.default_rng(2), (32, 32))
    assert GaussianBlur(p=0.0)(img) is img
    blurred = np.asarray(GaussianBlur(p=1.0)(img), dtype=float)
    assert np.abs(blurred - np.asarray(img, dtype=float)).mean() > 1
    assert Solarization(0.0)(img) is img
    assert np.array_equal(np.asarray(Solarization(1.0)(img)), np.asarray(ImageOps.solarize(img, 128)))
    aug = DataAugmentationiBOT((0.4, 1.0), (0.05, 0.4), 2, 1, 32, 16, blur_radius_scale=0.25)
    blurs = [t for tf in (aug.global_transfo1, aug.global_transfo2, aug.local_transfo)
             for t in tf.transforms if isinstance(t, GaussianBlur)]
    assert [b.prob for b in blurs] == [1.0, 0.1, 0.5]
    assert all(b.radius_scale == 0.25 for b in blurs)


def _jitters(aug):
    return [t for tf in (aug.global_transfo1, aug.global_transfo2, aug.local_transfo)
            for ra in tf.transforms[1].transforms if isinstance(ra, transforms.RandomApply)
            for t in ra.transforms if isinstance(t, transforms.ColorJitter)]


def test_color_jitter_scale():
    official = _jitters(DataAugmentationiBOT((0.4, 1.0), (0.05, 0.4), 2, 1, 32, 16))
    assert len(official) == 3
    for cj in official:  # the official strengths; torchvision stores them as (1 - s, 1 + s) / (-h, h)
        assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.contrast == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.8, 1.2)) and cj.hue == pytest.approx((-0.1, 0.1))
    for cj in _jitters(DataAugmentationiBOT((0.4, 1.0), (0.05, 0.4), 2, 1, 32, 16, color_jitter_scale=2.0)):
        assert cj.brightness == pytest.approx((0.2, 1.8)) and cj.saturation == pytest.approx((0.6, 1.4))
        assert cj.hue == pytest.approx((-0.2, 0.2))
    assert color_jitter(10.0).hue == pytest.approx((-0.5, 0.5))  # hue capped at torchvision's maximum


def test_getitem_format_and_collate(class_folder):
    ds = ImageFolderMask(class_folder, transform=_aug(2, 2), **MASK_KW)
    assert ds.has_labels and ds.classes == ["cat", "dog"] and len(ds) == 8
    crops, target, masks = ds[5]
    assert target == 1
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert [m.shape for m in masks] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert all(isinstance(m, np.ndarray) and m.dtype == bool for m in masks)
    images, labels, bmasks = next(iter(DataLoader(ds, batch_size=4)))
    assert len(images) == 4 and images[0].shape == (4, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 0]
    assert [tuple(m.shape) for m in bmasks] == [(4, 8, 8)] * 2 + [(4, 4, 4)] * 2
    assert bmasks[0].dtype == torch.bool


def test_mask_crops(class_folder):
    ds = ImageFolderMask(class_folder, transform=_aug(2, 3), mask_crops=2, **MASK_KW)
    crops, _, masks = ds[0]
    assert len(crops) == 5 and len(masks) == 2
    assert all(m.shape == (8, 8) for m in masks)
    images, _, bmasks = next(iter(DataLoader(ds, batch_size=3)))
    assert len(images) == 5 and [tuple(m.shape) for m in bmasks] == [(3, 8, 8)] * 2
    assert ImageFolderMask(class_folder, transform=_aug(2, 3), mask_crops=0, **MASK_KW)[0][2] == []


def test_pred_start_epoch_gating(class_folder):
    kw = dict(MASK_KW, pred_ratio=0.3, pred_ratio_var=0.0)
    ds = ImageFolderMask(class_folder, transform=_aug(2, 1), pred_start_epoch=2, **kw)
    assert all(m.any() for i in range(len(ds)) for m in ds[i][2][:2])  # no set_epoch: no gating
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert not any(m.any() for i in range(len(ds)) for m in ds[i][2])
    ds.set_epoch(2)
    assert all(m.any() for i in range(len(ds)) for m in ds[i][2][:2])


def _collect(ds, workers):
    out = []
    for crops, target, masks in DataLoader(ds, batch_size=3, num_workers=workers, shuffle=False):
        out.append((crops, target, masks))
    return out


def _same(a, b):
    return all(all(torch.equal(x, y) for x, y in zip(ca, cb)) and torch.equal(ta, tb)
               and all(torch.equal(x, y) for x, y in zip(ma, mb))
               for (ca, ta, ma), (cb, tb, mb) in zip(a, b))


def test_seeded_dataset_is_worker_independent(class_folder):
    ds = ImageFolderMask(class_folder, transform=_aug(2, 2), seed=17, **MASK_KW)
    ds.set_epoch(3)
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG untouched
    a = _collect(ds, 0)
    b = _collect(ds, 2)
    assert _same(a, b)
    # same (seed, epoch, index) from a fresh object -> same sample (resume)
    ds2 = ImageFolderMask(class_folder, transform=_aug(2, 2), seed=17, **MASK_KW)
    ds2.set_epoch(3)
    c2, _, m2 = ds2[4]
    c1, _, m1 = ds[4]
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))
    assert all(np.array_equal(x, y) for x, y in zip(m1, m2))
    # another epoch -> different crops
    ds.set_epoch(4)
    assert not any(torch.equal(x, y) for x, y in zip(ds[4][0], c1))


def test_sample_seeding_flag_selects_per_sample_or_official_streams(class_folder):
    """``--sample_seeding`` (default true): per-sample seeds, masks for the global crops, a loader generator
    of its own. ``false``: the official streams: global RNGs (so the caller's seeds decide the draws),
    masks for every crop, worker seeds from the global torch RNG (no loader generator)."""
    import random
    from types import SimpleNamespace
    from ibot.train.driver import build_data_loader, build_dataset
    from ibot.train.flags import get_args_parser
    base = ["--data_path", str(class_folder), "--global_crops_size", "32", "--local_crops_size", "16",
            "--local_crops_number", "2", "--batch_size_per_gpu", "2", "--num_workers", "0"]
    ctx = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"))
    seeded = build_dataset(get_args_parser().parse_args(base))
    seeded.set_epoch(1)
    assert (seeded.seed, seeded.mask_crops) == (0, 2)
    crops, _, masks = seeded[3]
    assert len(crops) == 4 and len(masks) == 2
    assert all(torch.equal(x, y) for x, y in zip(crops, seeded[3][0]))   # same (seed, epoch, index)
    assert build_data_loader(seeded, get_args_parser().parse_args(base), ctx)[1].generator is not None

    off_args = get_args_parser().parse_args(base + ["--sample_seeding", "false"])
    official = build_dataset(off_args)
    official.set_epoch(1)
    assert (official.seed, official.mask_crops) == (None, None)
    draws = []
    for _ in range(2):
        random.seed(5)
        torch.manual_seed(5)
        draws.append(official[3])
    (c1, _, m1), (c2, _, m2) = draws
    assert len(m1) == 4                                                  # every crop, as official
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))               # the global seeds decide
    assert all(np.array_equal(x, y) for x, y in zip(m1, m2))
    assert not all(torch.equal(x, y) for x, y in zip(official[3][0], c1))  # next draw of the stream
    assert build_data_loader(official, off_args, ctx)[1].generator is None


def test_flat_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        _rand_image(rng).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderMask(tmp_path, transform=_aug(2, 1), mask_crops=2, **MASK_KW)
    assert not ds.has_labels and len(ds) == 3 and ds.classes == []
    crops, target, masks = ds[2]
    assert target == -1 and len(crops) == 3 and len(masks) == 2
    _, labels, _ = next(iter(DataLoader(ds, batch_size=3)))
    assert labels.tolist() == [-1, -1, -1]
    inst = ImageFolderInstance(tmp_path)
    assert inst[1][1:] == (-1, 1)


def test_missing_and_empty_roots(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="--data_path") as e:
        ImageFolderMask(missing, transform=_aug(), **MASK_KW)
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty") as e:
        ImageFolderMask(empty, transform=_aug(), **MASK_KW)
    assert str(empty) in str(e.value)
    (empty / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderMask(empty, transform=_aug(), **MASK_KW)


def test_rgb_conversion(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "modes"
    root.mkdir()
    _rand_image(rng, mode="L").save(root / "a_gray.png")
    pal = _rand_image(rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "b_pal.png", transparency=0)
    _rand_image(rng, mode="RGBA").save(root / "c_rgba.png")
    _rand_image(rng, mode="CMYK").save(root / "d_cmyk.jpg")
    _rand_image(rng, mode="LA").save(root / "e_la.png")
    ds = ImageFolderInstance(root)
    modes = []
    for p, _ in ds.samples:
        with Image.open(p) as im:
            modes.append(im.mode)
    assert modes == ["L", "P", "RGBA", "CMYK", "LA"]
    for i in range(len(ds)):
        img, target, index = ds[i]
        assert img.mode == "RGB" and img.size == (40, 36) and target == -1 and index == i
    gray = np.asarray(rgb_loader(str(root / "a_gray.png")))
    assert np.array_equal(gray[..., 0], gray[..., 2])
    ds = ImageFolderMask(root, transform=_aug(2, 1), **MASK_KW)
    assert all(len(ds[i][0]) == 3 for i in range(len(ds)))


def test_corrupt_image_error_and_skip(class_folder, caplog):
    bad = class_folder / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = ImageFolderMask(class_folder, transform=_aug(2, 1), **MASK_KW)
    idx = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(BadImageError, match="1.png") as e:
        ds[idx]
    assert str(bad) in str(e.value)
    ds = ImageFolderMask(class_folder, transform=_aug(2, 1), skip_bad_images=True, seed=0,
                         **MASK_KW)
    with caplog.at_level(logging.WARNING, logger="ibot.data.folders"):
        crops, target, masks = ds[idx]
        again = ds[idx]
    assert len(crops) == 3 and len(masks) == 3 and target == 1  # replaced by the next sample
    assert ds.num_bad_images == 1 and ds.bad_images == {str(bad)}
    assert str(bad) in caplog.text
    assert all(torch.equal(x, y) for x, y in zip(crops, again[0]))  # deterministic replacement
    # the whole epoch loads
    assert len(_collect(ds, 0)) == 3


def test_fmnist_installed():
    missing = [f for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
               if not os.path.isfile(os.path.join(DEFAULT_SRC, f))]
    assert not missing, (f"Fashion-MNIST IDX files {missing} missing from {DEFAULT_SRC}: "
                         f"run `apt-get install dataset-fashion-mnist`")


def test_fmnist_converter(tmp_path):
    out = tmp_path / "fm"
    res = build_fmnist_folder(str(out), size=16, per_class_train=3, per_class_val=2)
    assert (res["train"], res["val"], res["classes"], res["built"]) == (30, 20, 10, True)
    train = ImageFolderInstance(out / "train")
    assert train.classes == list(CLASS_DIRS) and len(train) == 30
    assert sorted(train.targets) == sorted(list(range(10)) * 3)
    images, labels = load_split("train", DEFAULT_SRC)
    first = int(np.flatnonzero(labels == 9)[0])
    p = out / "train" / CLASS_DIRS[9] / f"{first:05d}.png"
    with Image.open(p) as im:
        img = im.convert("RGB") if im.mode == "RGB" else im.copy()
    assert img.mode == "RGB" and img.size == (16, 16)
    ref = Image.fromarray(images[first]).resize((16, 16), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(img)[..., 0], np.asarray(ref))
    mtime = os.path.getmtime(p)
    again = build_fmnist_folder(str(out), size=16, per_class_train=3, per_class_val=2)
    assert again["built"] is False and (again["train"], again["val"]) == (30, 20)
    assert os.path.getmtime(p) == mtime
    with pytest.raises(ValueError, match="already holds"):
        build_fmnist_folder(str(out), size=32, per_class_train=3, per_class_val=2)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_fmnist_folder(str(tmp_path / "x"), src=str(tmp_path / "nosrc"))


def test_make_fmnist_cli(tmp_path, capsys):
    mod = load_repo_file("tools/make_fmnist.py")
    assert mod.main(["--out", str(tmp_path / "o"), "--size", "28", "--per_class_train", "1",
                     "--per_class_val", "1"]) == 0
    assert "train 10 / val 10" in capsys.readouterr().out
    with Image.open(next((tmp_path / "o" / "val" / CLASS_DIRS[0]).iterdir())) as im:
        assert im.size == (28, 28)
    assert mod.main(["--out", str(tmp_path / "p"), "--src", str(tmp_path / "none")]) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
