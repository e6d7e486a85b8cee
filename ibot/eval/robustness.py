"""Metrics and loops of the robustness analyses (evaluation.md §3.8-3.10).

* ImageNet-C: error per severity = 1 − top-1; corruption error = mean over the 5 severities;
  unnormalised mCE = mean over the 19 corruptions (NOT divided by AlexNet's errors).
* ImageNet-A: logits restricted to the 200 ImageNet-A classes; RMS calibration error with adaptive
  bins of 100 samples sorted by confidence (the last bin absorbs the remainder and, as officially,
  is skipped: quirk kept for parity); AURRA = mean over response rates of the accuracy among the
  most confident samples.
* ImageNet-9: 1000-way predictions mapped to the 9 classes (−1 counts as wrong); BG-Gap =
  acc(mixed_same) − acc(mixed_rand); the challenge counts foregrounds that some ``only_bg_t``
  background makes the model misclassify.
"""
import argparse
import json
import os

import numpy as np
import torch

from ibot.eval import classifiers
from ibot.utils.misc import bool_flag

__all__ = ["CORRUPTIONS", "IN9_VARIATIONS", "calib_err", "aurra", "corruption_error", "unnormalized_mce",
           "bg_gap", "map_predictions", "composite", "count_correct", "is_vulnerable", "NormalizedClassifier",
           "load_class_mapping", "build_classifier", "classifier_parser", "classifier_from_args", "in9_parser",
           "in9_classifier"]

# official order of analysis/corruptions_surf_variations/eval.py (15 ImageNet-C + 4 extra)
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate")
IN9_VARIATIONS = ("mixed_next", "mixed_rand", "mixed_same", "no_fg", "only_bg_b", "only_bg_t", "only_fg",
                  "original")


def calib_err(confidence, correct, p="2", beta=100, skip_last_bin=True):
    """Calibration error with adaptive bins of ``beta`` samples (official ``calibration_tools.calib_err``).

    Args:
        confidence: (N,) max softmax probabilities; correct: (N,) 0/1.
        p: ``'2'`` (RMS), ``'1'`` (mean absolute) or ``'infty'`` (max).
        beta: target bin size; there are ⌊N/beta⌋ bins and the last one absorbs the remainder.
        skip_last_bin: True as officially (the loop stops before the last bin).
    Returns:
        float; with fewer than ``beta`` samples there is no bin and a ValueError is raised.
    """
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    if n < beta:
        raise ValueError(f"calibration error needs at least beta={beta} samples, got {n}")
    idx = np.argsort(confidence, kind="stable")
    confidence, correct = confidence[idx], correct[idx]
    bins = [[i * beta, (i + 1) * beta] for i in range(n // beta)]
    bins[-1][1] = n
    if skip_last_bin:
        bins = bins[:-1]
    cerr = 0.0
    for lo, hi in bins:
        diff = abs(np.nanmean(confidence[lo:hi]) - np.nanmean(correct[lo:hi]))
        if p == "2":
            cerr += (hi - lo) / n * diff ** 2
        elif p == "1":
            cerr += (hi - lo) / n * diff
        elif p in ("infty", "infinity", "max"):
            cerr = max(cerr, diff)
        else:
            raise ValueError("p must be '1', '2' or 'infty'")
    return float(np.sqrt(cerr)) if p == "2" else float(cerr)


def aurra(confidence, correct):
    """Area under the response-rate-accuracy curve: mean over r = 1..N of the accuracy of the r most
    confident samples (ties: NumPy's argsort order, reversed, as officially). Returns a float."""
    order = np.argsort(np.asarray(confidence))[::-1]
    curve = np.cumsum(np.asarray(correct, dtype=np.float64)[order]) / np.arange(1, len(order) + 1)
    return float(np.mean(curve))


def corruption_error(errors_per_severity):
    """Mean of the per-severity errors (fractions) of one corruption."""
    return float(np.mean(errors_per_severity))


def unnormalized_mce(errors):
    """Unnormalised mCE: mean of the corruption errors. ``errors``: {corruption: [e_1..e_5]} or
    {corruption: mean error}. Returns a fraction."""
    values = [corruption_error(v) if np.ndim(v) else float(v) for v in errors.values()]
    return float(np.mean(values))


def bg_gap(accuracies):
    """BG-Gap = acc(mixed_same) − acc(mixed_rand), in the unit of ``accuracies`` (dict variation -> acc)."""
    return accuracies["mixed_same"] - accuracies["mixed_rand"]


def build_classifier(arch, checkpoint, device, num_classes=1000, patch_size=16, linear_eval=True, img_size=224):
    """Robustness classifier (:mod:`ibot.eval.classifiers`) from ``checkpoint`` on ``device``, eval mode.

    An empty ``checkpoint`` keeps the random initialisation (printed warning); a path that is not a
    file is an error (official message)."""
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"=> no checkpoint found at '{checkpoint}'")
    if not checkpoint:
        print("WARNING: no --checkpoint: evaluating a RANDOMLY initialised classifier")
    if arch not in classifiers.FEATURE_SETTINGS:
        raise ValueError(f"--arch {arch!r}: the robustness classifiers are {sorted(classifiers.FEATURE_SETTINGS)}")
    model = getattr(classifiers, arch)(checkpoint or None, patch_size=patch_size, linear_eval=linear_eval,
                                       num_classes=num_classes, img_size=img_size)
    return model.to(device).eval()


def classifier_parser(img_size=224):
    """Parent parser of the robustness scripts (flags that are not common to all evaluation scripts):
    ``--checkpoint`` (classifier file), ``--linear_eval`` (true: combined backbone + linear file),
    ``--img_size`` (size the ViT is built for; the centre crop of ImageNet-C), ``--use_cuda``,
    ``--output_dir`` (JSON results, optional). ``--arch`` / ``--patch_size`` come from
    :func:`ibot.eval.flags.backbone_parser`."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--checkpoint", default=None, help="classifier file (model / state_dict entry); unset = random")
    p.add_argument("--linear_eval", default=True, type=bool_flag, help="combined backbone + linear classifier")
    p.add_argument("--img_size", default=img_size, type=int, help="input size the classifier is built for")
    p.add_argument("--use_cuda", default=True, type=bool_flag)
    p.add_argument("--output_dir", default="", type=str, help="where to write the JSON results (optional)")
    return p


def classifier_from_args(args, num_classes=1000):
    """``(classifier, device)`` for the flags of :func:`classifier_parser` and ``--arch``/``--patch_size``."""
    device = torch.device("cuda" if args.use_cuda and torch.cuda.is_available() else "cpu")
    return build_classifier(args.arch, args.checkpoint, device, num_classes, args.patch_size, args.linear_eval,
                            args.img_size), device


def in9_parser():
    """Parent parser of the two ImageNet-9 scripts: ``--data-path`` (official spelling, same destination as
    ``--data_path``) and ``--in9`` (the model has 9 outputs)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data-path", dest="data_path", default=argparse.SUPPRESS, help="official name of --data_path")
    p.add_argument("--in9", dest="in9", default=False, action="store_true", help="the model has 9 output classes")
    return p


def in9_classifier(args, mapping_file):
    """``(classifier on [0, 1] inputs, device, mapping or None)``: 9 outputs with ``args.in9``, else 1000
    mapped to IN-9 through ``mapping_file`` (``in_to_in9.json``)."""
    net, device = classifier_from_args(args, 9 if args.in9 else 1000)
    mapping = None if args.in9 else load_class_mapping(mapping_file)
    return NormalizedClassifier(net).to(device).eval(), device, mapping


class NormalizedClassifier(torch.nn.Module):
    """``model(normalise(clamp(x, 0, 1)))`` for inputs in [0, 1] (the backgrounds-challenge wrapper)."""

    def __init__(self, model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        """x (B, 3, H, W) in [0, 1] -> logits."""
        return self.model((x.clamp(0, 1) - self.mean) / self.std)


def load_class_mapping(path, n_classes=1000):
    """Read ``in_to_in9.json`` (``{"<1k index>": <IN-9 class or -1>}``) into a (n_classes,) long tensor."""
    with open(path) as f:
        table = json.load(f)
    mapping = torch.full((n_classes,), -1, dtype=torch.long)
    for k, v in table.items():
        mapping[int(k)] = int(v)
    return mapping


def map_predictions(pred, mapping):
    """Map predicted class indices (tensor (B,)) through ``mapping`` (1D long tensor, −1 = no class)."""
    return mapping.to(pred.device)[pred]


def composite(backgrounds, image, mask):
    """``bg · (1 − m) + image · m``: backgrounds (B, 3, H, W), image (3, H, W), mask (1|3, H, W) in [0, 1]."""
    return backgrounds * (1 - mask) + image * mask


@torch.no_grad()
def count_correct(model, loader, device, mapping=None, progress=None):
    """Top-1 correct count and total over ``loader`` of ``(images, labels)``; predictions mapped by
    ``mapping`` (see :func:`map_predictions`) when given. Returns ``(correct, total)``."""
    correct = total = 0
    iterable = progress(loader) if progress is not None else loader
    for images, target in iterable:
        pred = model(images.to(device)).argmax(dim=1)
        if mapping is not None:
            pred = map_predictions(pred, mapping)
        correct += int((pred.cpu() == target).sum())
        total += target.shape[0]
    return correct, total


@torch.no_grad()
def is_vulnerable(model, bg_loader, image, mask, fg_class, device, mapping=None):
    """True if some background of ``bg_loader`` (batches of (B, 3, H, W) in [0, 1]) composited with
    the foreground makes the prediction differ from ``fg_class``."""
    image, mask = image.to(device), mask.to(device)
    for backgrounds, _ in bg_loader:
        pred = model(composite(backgrounds.to(device), image, mask)).argmax(dim=1)
        if mapping is not None:
            pred = map_predictions(pred, mapping)
        if bool((pred != fg_class).any()):
            return True
    return False
