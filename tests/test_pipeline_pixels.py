"""Pixels of the fast and device pipelines against the official PIL path for the same parameters,
and the per-sample seeding of the data set with them (issue 17)."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ibot.data.augment import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationiBOT
from ibot.data.device_augment import NUM_PARAMS, PARAM_FIELDS, augment_uint8, normalize_uint8, prepare_crops
from ibot.data.fast_augment import (CropDraw, DeviceMultiCrop, FastMultiCrop, _crop_resize_flip,
                                    _render_colour, _cv2)
from ibot.data.folders import ImageFolderMask

COL = {n: i for i, n in enumerate(PARAM_FIELDS)}
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
RECIPE = ((0.25, 1.0), (0.05, 0.25), 2, 6)   # ViT-S/16 README recipe scales, 6 local crops


def _photo():
    """A real photograph (scikit-learn's), ImageNet-sized: 500 x 375."""
    import sklearn.datasets
    path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg")
    return Image.open(path).convert("RGB").crop((60, 20, 560, 395))


def _levels(x):
    """Normalised float crop -> 8-bit levels (float)."""
    return (x * STD + MEAN) * 255.0


def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _seeded(transform, image, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    return transform(image)


def _compare(path, seeds=range(6)):
    """PSNR (dB) and max |difference| (8-bit levels) of every crop against the official path."""
    image = _photo()
    official = DataAugmentationiBOT(*RECIPE)
    ours = path(*RECIPE)
    psnr, maxdiff = [], []
    for seed in seeds:
        ref = [_levels(c) for c in _seeded(official, image, seed)]
        out = _seeded(ours, image, seed)
        if isinstance(out, tuple):  # device path: worker half here, device half on the CPU
            crops, params = out
            out = [augment_uint8(c[None], params[k:k + 1], IMAGENET_MEAN, IMAGENET_STD)[0]
                   for k, c in enumerate(crops)]
        for a, b in zip(ref, out):
            b = _levels(b)
            psnr.append(_psnr(a, b))
            maxdiff.append(float((a - b).abs().max()))
    return np.array(psnr), np.array(maxdiff)


def test_fast_path_pixels_match_the_official_path():
    psnr, maxdiff = _compare(FastMultiCrop)
    # measured on this machine: median 51 dB, worst crop 38 dB (a small blur radius, where PIL's
    # three box blurs are furthest from a Gaussian)
    assert np.median(psnr) > 46 and psnr.min() > 34, (np.median(psnr), psnr.min())
    assert maxdiff.max() <= 30


def test_device_path_pixels_match_the_official_path():
    psnr, maxdiff = _compare(DeviceMultiCrop)
    # measured: median 45 dB, worst crop 37 dB (no 8-bit rounding between operations on the device)
    assert np.median(psnr) > 41 and psnr.min() > 33, (np.median(psnr), psnr.min())
    assert maxdiff.max() <= 30


def test_pixel_check_detects_other_parameters():
    """Negative control: the same comparison with another seed (other parameters) fails by far."""
    image = _photo()
    ref = _levels(_seeded(DataAugmentationiBOT(*RECIPE), image, 0)[1])
    other = _levels(_seeded(FastMultiCrop(*RECIPE), image, 1)[1])
    assert _psnr(ref, other) < 25


def test_resize_and_pil_colour_operations():
    """The uint8 tensor resize is within a few levels of PIL's bicubic (PSNR > 50 dB; measured
    55-75 dB, at most 3 levels); brightness, contrast,
    saturation, grayscale and solarisation are PIL's own pixels."""
    image = _photo()
    tensor = TF.pil_to_tensor(image)
    for box, size in (((10, 20, 300, 330), 224), ((0, 0, 375, 500), 224), ((30, 50, 150, 120), 96)):
        draw = CropDraw(box, True, np.zeros(NUM_PARAMS))
        ours = _crop_resize_flip(tensor, draw, size).int()
        ref = TF.pil_to_tensor(TF.hflip(TF.resized_crop(image, *box, [size, size], InterpolationMode.BICUBIC))).int()
        assert (ours - ref).abs().max() <= 4 and _psnr(ours.float(), ref.float()) > 50
    crop = TF.resized_crop(image, 10, 20, 300, 330, [96, 96], InterpolationMode.BICUBIC)
    params = np.zeros(NUM_PARAMS)
    params[[COL["jitter"], COL["grayscale"], COL["solarize"]]] = 1
    params[COL["order_0"]:COL["order_3"] + 1] = (2, 0, 3, 1)
    params[COL["brightness"]:COL["hue"] + 1] = (1.3, 0.7, 1.15, 0.0)  # hue 0: no hue operation
    ref = TF.adjust_contrast(TF.adjust_brightness(TF.adjust_saturation(crop, 1.15), 1.3), 0.7)
    ref = np.asarray(TF.rgb_to_grayscale(ref, 3))
    ref = np.where(ref >= 128, 255 - ref, ref)
    assert np.array_equal(_render_colour(crop, params, _cv2()), ref)


def test_device_ops_identity_and_normalisation():
    """Parameters that apply nothing leave the crops unchanged; normalisation is ToTensor+Normalize."""
    x = torch.randint(0, 256, (5, 3, 20, 24), dtype=torch.uint8)
    params = torch.zeros(5, NUM_PARAMS)
    params[:, COL["order_0"]:COL["order_3"] + 1] = torch.tensor([0.0, 1, 2, 3])
    params[:, COL["brightness"]:COL["hue"] + 1] = torch.tensor([1.0, 1, 1, 0])
    params[2, COL["jitter"]] = 1  # jitter with identity strengths
    out = augment_uint8(x, params, IMAGENET_MEAN, IMAGENET_STD)
    ref = torch.stack([TF.normalize(TF.to_tensor(TF.to_pil_image(c)), IMAGENET_MEAN, IMAGENET_STD) for c in x])
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD), ref, atol=1e-5)
    with pytest.raises(ValueError, match="parameters of shape"):
        augment_uint8(x, params[:4], IMAGENET_MEAN, IMAGENET_STD)


def test_prepare_crops_batches_by_size_like_crop_by_crop():
    """The training loop's entry: same-size crops augmented together give the crop-by-crop result;
    uint8 crops without parameters are only normalised; float crops only moved."""
    t = DeviceMultiCrop((0.25, 1.0), (0.05, 0.25), 2, 3, 32, 16)
    torch.manual_seed(0)
    random.seed(0)
    images = [torch.randint(0, 256, (3, 60, 50), dtype=torch.uint8) for _ in range(4)]
    crops, params = torch.utils.data.default_collate([t(im) for im in images])
    assert params.shape == (4, 5, NUM_PARAMS)
    out = prepare_crops(crops, params, torch.device("cpu"))
    for k in range(5):
        ref = augment_uint8(crops[k], params[:, k], IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(out[k], ref, atol=1e-6)
    plain = prepare_crops(crops, None, torch.device("cpu"))
    assert torch.allclose(plain[2], normalize_uint8(crops[2], IMAGENET_MEAN, IMAGENET_STD))
    assert prepare_crops(plain, None, torch.device("cpu"))[0] is plain[0]
    with pytest.raises(ValueError, match="colour parameters of shape"):
        prepare_crops(crops, params[:, :4], torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# seeding: ImageFolderMask(seed=...) with the new transforms
# ------------------------------------------------------------------------------------------------
MASK_KW = dict(patch_size=4, pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], pred_shape="block",
               mask_crops=2)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    image = _photo()
    for k in range(6):
        image.crop((k * 20, k * 10, k * 20 + 200, k * 10 + 150)).save(root / f"p{k}.jpg", quality=90)
    return root


def _dataset(root, transform_cls, seed=5):
    ds = ImageFolderMask(root, transform=transform_cls((0.25, 1.0), (0.05, 0.25), 2, 3, 32, 16), seed=seed,
                         **MASK_KW)
    ds.set_epoch(1)
    return ds


def _flatten(batches):
    return [t for b in batches for part in b for t in (part if isinstance(part, list) else [part])]


@pytest.mark.parametrize("transform_cls", [FastMultiCrop, DeviceMultiCrop])
def test_seeded_samples_repeat_and_do_not_depend_on_workers(photo_folder, transform_cls):
    ds = _dataset(photo_folder, transform_cls)
    sample = ds[3]
    if transform_cls is DeviceMultiCrop:
        crops, target, masks, params = sample
        assert params.shape == (5, NUM_PARAMS) and all(c.dtype == torch.uint8 for c in crops)
    again = _dataset(photo_folder, transform_cls)[3]  # a fresh data set: a resumed run
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
               for a, b in zip(_flatten([sample]), _flatten([again])))
    ds.set_epoch(2)
    assert not torch.equal(ds[3][0][0], sample[0][0])
    ds.set_epoch(1)
    one = _flatten(DataLoader(ds, batch_size=3, num_workers=0))
    two = _flatten(DataLoader(ds, batch_size=3, num_workers=2))
    assert len(one) == len(two) and all(torch.equal(a, b) for a, b in zip(one, two))
