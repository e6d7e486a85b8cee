"""ImageNet-A accuracy and calibration (official ``analysis/natural_adv_examples/eval.py``, evaluation.md §3.9;
wrapper ``analysis/eval_natural_adv_examp.sh``).

    python analysis/natural_adv_examples/eval.py --arch vit_small --checkpoint combined.pth \
        --data data/imnet_a/imagenet-a [--use_cuda false]

Layout: ``<data>/<wnid>/*``, the 200 ImageNet-A class folders (sorted wnid order = ImageNet-A class
order). The 1000 logits are restricted to the 200 ImageNet-A classes (the 1k indices of
``imagenet_a_classes.json`` next to this file, ascending, from the ImageNet-A distribution);
prediction = argmax over those columns, confidence = max softmax over them. Transform: resize 256
(bilinear), centre crop 224, ImageNet normalisation; batch 128 (``--img_size s``: resize round(s·256/224),
crop s).

Output: ``ImageNet-A Accuracy (%)``, ``RMS Calib Error (%)`` (adaptive bins of 100 sorted samples,
the last bin skipped as officially) and ``AURRA (%)``, a ``json:`` line and, with ``--output_dir``,
``imagenet_a.json``. Additions: ``--use_cuda``, ``--batch_size``, ``--num_workers``, ``--patch_size``,
``--img_size``, ``--linear_eval``, ``--bin_size`` (100), ``--output_dir``; ViT classifiers only.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ibot.eval.features import IMAGENET_MEAN, IMAGENET_STD
from ibot.eval.flags import backbone_parser, data_parser
from ibot.eval.robustness import aurra, calib_err, classifier_from_args, classifier_parser

__all__ = ["get_args_parser", "main", "imagenet_a_indices", "CLASS_FILE"]

CLASS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_a_classes.json")


def imagenet_a_indices(path=CLASS_FILE):
    """The 200 ImageNet-1k indices of the ImageNet-A classes, ascending (list of int)."""
    with open(path) as f:
        idx = json.load(f)["indices_in_1k"]
    if len(idx) != 200 or idx != sorted(idx):
        raise ValueError(f"{path}: expected 200 ascending ImageNet indices")
    return idx


def get_args_parser():
    """Official flags (``--data`` = ``--data_path``) plus the additions of the module docstring."""
    p = argparse.ArgumentParser("ImageNet-A accuracy and calibration", parents=[
        backbone_parser(family="vit", window_size=None, pretrained_weights=False, checkpoint_key=None),
        data_parser("data/imnet_a", batch_size=128, batch_flag="--batch_size", num_workers=4), classifier_parser()])
    p.add_argument("--data", dest="data_path", default=argparse.SUPPRESS, help="official name of --data_path")
    p.add_argument("--bin_size", default=100, type=int, help="samples per calibration bin (official 100)")
    return p


@torch.no_grad()
def main(argv=None):
    """Returns ``{"accuracy", "rms_calib_error", "aurra"}`` (fractions) plus ``confidence`` / ``correct`` lists."""
    args = get_args_parser().parse_args(argv)
    if not os.path.isdir(args.data_path):
        raise FileNotFoundError(f"ImageNet-A folder not found: {args.data_path} (expected <data>/<wnid>/<image>, "
                                f"the 200 ImageNet-A classes)")
    n_dirs = sum(e.is_dir() for e in os.scandir(args.data_path))
    if n_dirs != 200:
        raise FileNotFoundError(f"{args.data_path} holds {n_dirs} class folders; ImageNet-A has 200 (<data>/<wnid>/)")
    indices = torch.tensor(imagenet_a_indices())
    net, device = classifier_from_args(args, 1000)
    resize = round(args.img_size * 256 / 224)      # official: 256 for the 224 crop
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(args.img_size),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(args.data_path, transform=tf)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    confidence, correct = [], []
    start = time.time()
    for i, (images, target) in enumerate(loader):
        out = net(images.to(device))[:, indices.to(device)]
        conf, pred = F.softmax(out, dim=1).max(dim=1)
        confidence.extend(conf.cpu().tolist())
        correct.extend((pred.cpu() == target).int().tolist())
        if i % 10 == 0 or i == len(loader) - 1:
            eta = (time.time() - start) / (i + 1) * (len(loader) - i - 1)
            print(f"[{i + 1}/{len(loader)}] batches, eta {eta:.0f} s", flush=True)
    acc = float(np.mean(correct))
    print("ImageNet-A Accuracy (%):", round(100 * acc, 4))
    rms = calib_err(np.array(confidence), np.array(correct), p="2", beta=args.bin_size)
    area = aurra(np.array(confidence), np.array(correct))
    print("\t\t\t\tBaseline")
    print("RMS Calib Error (%): \t\t{:.2f}".format(100 * rms))
    print("AURRA (%): \t\t\t{:.2f}".format(100 * area))
    record = {"accuracy": acc, "rms_calib_error": rms, "aurra": area, "n_images": len(correct),
              "bin_size": args.bin_size}
    print("json: " + json.dumps(record))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "imagenet_a.json"), "w") as f:
            json.dump(record, f, indent=1)
    return {**record, "confidence": confidence, "correct": correct}


if __name__ == "__main__":
    main()
