"""Frozen-feature extraction shared by every frozen-backbone protocol (k-NN, logistic regression,
linear probes, unsupervised classification) — evaluation.md §1.4 and §2.1.

Feature vector of one image for ``--avgpool_patchtokens a`` and ``--n_last_blocks n`` (ViT, D wide):

====  ==========================================================================  ============
 a    vector                                                                      dimension
====  ==========================================================================  ============
 0    concat over the last n blocks of token 0 of ``norm(block output)``          n·D
 1    mean of the patch tokens (token 0 excluded) of the last block; the model    D
      is built with ``use_mean_pooling=True`` so those tokens are NOT normed
 2    [token 0 of the last n blocks, normed] + [mean of the normed patch tokens   (n+1)·D
      of the last block]
====  ==========================================================================  ============

Swin backbones follow the same rules on their ``get_intermediate_layers`` output, whose token 0 is
the average-pooled token (so a=0 concatenates the pooled tokens of the last n blocks).

Data: the evaluation transform is the official one (shorter side resized with bicubic interpolation
to ``resize_size`` = 256, centre crop ``crop_size`` = 224, ImageNet mean/std); the two sizes are
parameters so that small images (e.g. 32-px Fashion-MNIST) can be evaluated at their own size.
"""
import logging
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ibot.models import arch_choices, create_backbone, is_model, model_family
from ibot.utils.distributed import concat_all_gather, is_dist_avail_and_initialized, unwrap
from ibot.utils.metric_logger import MetricLogger

logger = logging.getLogger("ibot.eval.features")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = ["build_backbone", "frozen_features", "feature_dim", "extract_features", "IndexedDataset",
           "eval_transform", "train_transform", "check_image_folder", "image_folder", "make_loader",
           "multiscale_features", "MULTISCALE_SCALES"]

MULTISCALE_SCALES = (1.0, 1 / 2 ** 0.5, 0.5)   # official multi-scale retrieval features


def build_backbone(arch, patch_size=16, window_size=7, avgpool_patchtokens=0, img_size=224, **kwargs):
    """Build an evaluation backbone from the registry (no head; eval-time options of §1.4).

    Args:
        arch: ``vit_tiny|vit_small|vit_base|vit_large`` or ``swin_tiny|swin_small|swin_base|swin_large``.
        patch_size: ViT patch size (Swin always uses 4).
        window_size: Swin window size.
        avgpool_patchtokens: 1 builds the ViT with ``use_mean_pooling=True`` (final norm = Identity).
        img_size: input size the ViT position embedding is created for (224 officially; the crop size
            of the data for small images — other sizes are handled by interpolation anyway).
        kwargs: forwarded to the factory.
    Returns:
        the backbone ``nn.Module`` (random init), in eval mode with ``requires_grad`` off.
    """
    if not is_model(arch):
        raise ValueError(f"unknown architecture {arch!r}; available: {arch_choices()}")
    if model_family(arch) == "swin":
        model = create_backbone(arch, window_size=window_size, num_classes=0, **kwargs)
    else:
        model = create_backbone(arch, patch_size=patch_size, img_size=img_size, num_classes=0,
                                use_mean_pooling=avgpool_patchtokens == 1, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_features(model, images, n_last_blocks=1, avgpool_patchtokens=0):
    """Frozen feature vectors of a batch (§1.4). Call under ``torch.no_grad()``.

    Args:
        model: backbone with ``get_intermediate_layers(x, n)`` (ViT or Swin; wrappers are unwrapped).
        images: (B, 3, H, W) float tensor on the model's device.
        n_last_blocks: n, number of last blocks whose token 0 is used (a ∈ {0, 2}).
        avgpool_patchtokens: a ∈ {0, 1, 2} (table in the module docstring).
    Returns:
        (B, d) float tensor, d = D·(n·[a≠1] + [a>0]) for a ViT of width D.
    """
    if avgpool_patchtokens not in (0, 1, 2):
        raise ValueError(f"avgpool_patchtokens must be 0, 1 or 2, got {avgpool_patchtokens}")
    net = unwrap(model)
    n = 1 if avgpool_patchtokens == 1 else n_last_blocks
    inter = net.get_intermediate_layers(images, n)
    out = []
    if avgpool_patchtokens != 1:
        out.extend(x[:, 0] for x in inter)
    if avgpool_patchtokens > 0:
        out.append(inter[-1][:, 1:].mean(dim=1))
    return torch.cat(out, dim=-1).float()


@torch.no_grad()
def feature_dim(model, n_last_blocks=1, avgpool_patchtokens=0, img_size=224, device=None):
    """Dimension d of :func:`frozen_features`, found by one forward of a (1, 3, img_size, img_size) zero image."""
    net = unwrap(model)
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    d = frozen_features(net, torch.zeros(1, 3, img_size, img_size, device=device), n_last_blocks,
                        avgpool_patchtokens).shape[-1]
    net.train(was_training)
    return int(d)


class IndexedDataset(Dataset):
    """Wrap a dataset returning ``(image, label)`` so that it returns ``(image, label, index)``."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index][:2]
        return image, label, index

    @property
    def classes(self):
        return getattr(self.base, "classes", None)

    @property
    def targets(self):
        return getattr(self.base, "targets", None)


@torch.no_grad()
def extract_features(model, loader, n_last_blocks=1, avgpool_patchtokens=0, device=None, bank_device=None,
                     l2_normalize=True, multiscale=False, feature_fn=None, print_freq=None, header=""):
    """Frozen features of a whole dataset, gathered across ranks.

    Args:
        model: backbone (see :func:`frozen_features`), run in eval mode (its mode is restored after).
        loader: DataLoader whose batches are ``(images, labels, indices)`` or ``(images, labels)``
            (then the loader must not shuffle). With a ``DistributedSampler`` every rank extracts its
            shard and the shards are all-gathered; with any other sampler the rank processes the
            whole dataset itself.
        n_last_blocks, avgpool_patchtokens: §1.4 options.
        device: where the model runs (default: device of its parameters).
        bank_device: where the (N, d) result is kept (default: ``device``).
        l2_normalize: L2-normalise every row (k-NN / logistic regression convention).
        multiscale: use :func:`multiscale_features` (retrieval) instead of :func:`frozen_features`.
        feature_fn: optional ``fn(model, images) -> (B, d)`` replacing both (e.g. copy detection).
        print_freq: print a progress line with an ETA every ``print_freq`` batches (``header`` first).
    Returns:
        (features, labels): (N, d) float tensor and (N,) int64 tensor on ``bank_device``, row i =
        sample i of ``loader.dataset`` (N = ``len(loader.dataset)``), identical on every rank.
    """
    net = unwrap(model)
    if device is None:
        device = next(net.parameters()).device
    bank_device = device if bank_device is None else bank_device
    distributed = is_dist_avail_and_initialized() and isinstance(loader.sampler, DistributedSampler)
    was_training = net.training
    net.eval()
    n_total = len(loader.dataset)
    features = labels = None
    seen = torch.zeros(n_total, dtype=torch.bool)
    offset = 0
    if print_freq:
        batches = MetricLogger(delimiter="  ").log_every(loader, print_freq, header)
    else:
        batches = loader
    for batch in batches:
        images, targets = batch[0], batch[1]
        if len(batch) > 2:
            index = torch.as_tensor(batch[2])
        else:
            index = torch.arange(offset, offset + len(targets))
        offset += len(targets)
        images = images.to(device, non_blocking=True)
        if feature_fn is not None:
            feats = feature_fn(net, images)
        elif multiscale:
            feats = multiscale_features(net, images, n_last_blocks, avgpool_patchtokens)
        else:
            feats = frozen_features(net, images, n_last_blocks, avgpool_patchtokens)
        targets = torch.as_tensor(targets).to(device)
        index = index.to(device)
        if distributed:
            feats, targets, index = (concat_all_gather(t) for t in (feats, targets, index))
        if features is None:
            features = torch.zeros(n_total, feats.shape[-1], dtype=feats.dtype, device=bank_device)
            labels = torch.full((n_total,), -1, dtype=torch.long, device=bank_device)
        index_b = index.to(bank_device)
        features.index_copy_(0, index_b, feats.to(bank_device))
        labels.index_copy_(0, index_b, targets.long().to(bank_device))
        seen[index.cpu()] = True
    net.train(was_training)
    if features is None:
        raise ValueError("the data loader yielded no batch (empty dataset?)")
    if not bool(seen.all()):
        raise RuntimeError(f"feature extraction covered {int(seen.sum())} of {n_total} samples")
    if l2_normalize:
        features = nn.functional.normalize(features, dim=1, p=2)
    return features, labels


def multiscale_features(model, images, n_last_blocks=1, avgpool_patchtokens=0, scales=MULTISCALE_SCALES):
    """Mean of :func:`frozen_features` over bilinear rescalings of ``images`` (B, 3, H, W), each row then
    divided by its L2 norm (official: the norm of the batch, the same for its batch size 1). Returns (B, d)."""
    total = None
    for s in scales:
        x = images if s == 1 else nn.functional.interpolate(images, scale_factor=s, mode="bilinear",
                                                           align_corners=False)
        f = frozen_features(model, x, n_last_blocks, avgpool_patchtokens)
        total = f if total is None else total + f
    return nn.functional.normalize(total / len(scales), dim=-1, p=2)


def eval_transform(resize_size=256, crop_size=224):
    """Official evaluation transform: bicubic resize of the shorter side, centre crop, ImageNet normalise.

    Returns a torchvision transform mapping a PIL image to a (3, crop_size, crop_size) tensor.
    """
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(crop_size=224):
    """Official linear-probe training transform: RandomResizedCrop (torchvision defaults), flip, normalise.

    Returns a torchvision transform mapping a PIL image to a (3, crop_size, crop_size) tensor.
    """
    from torchvision import transforms
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_image_folder(root):
    """Fail early, naming the folder, unless ``root`` holds class sub-folders with image files.

    Returns the sorted list of class names.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    for c in classes:
        for _, _, files in os.walk(os.path.join(root, c), followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return classes
    raise FileNotFoundError(f"data folder {root} contains no image files")


def image_folder(root, transform, with_index=True):
    """ImageFolder over ``root`` (checked first); returns ``(img, label, index)`` when ``with_index``."""
    from torchvision.datasets import ImageFolder
    check_image_folder(root)
    ds = ImageFolder(root, transform=transform)
    return IndexedDataset(ds) if with_index else ds


def make_loader(dataset, batch_size, num_workers=0, shuffle=False, distributed=None, drop_last=False,
                pin_memory=None, seed=0):
    """DataLoader with a ``DistributedSampler`` when a process group is up (``distributed=None``: auto).

    Args:
        dataset: any map-style dataset.
        batch_size: per-process batch size.
        shuffle: shuffle (training) or keep the order (feature extraction).
    Returns:
        ``torch.utils.data.DataLoader``.
    """
    if distributed is None:
        distributed = is_dist_avail_and_initialized()
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if distributed else None
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      shuffle=(shuffle if sampler is None else False), num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last)
