"""ImageNet-C corruption errors and the unnormalised mCE (official ``analysis/corruptions_surf_variations/eval.py``,
evaluation.md §3.8; wrapper ``analysis/eval_corr_surf_vari.sh``).

    python analysis/corruptions_surf_variations/eval.py --arch vit_small --checkpoint combined.pth \
        --data data/imnet_c [--use_cuda false]

Layout: ``<data>/<corruption>/<severity 1..5>/<wnid>/*`` (images already 224 px; all 1000 wnids, so
that the sorted folder order is the class index). Classifier: :mod:`ibot.eval.classifiers` (a
combined backbone + linear file from ``analysis/combine_ckpt.py``, or a fine-tuned ViT with
``--linear_eval false``). Transform: centre crop ``--img_size`` (224), ImageNet normalisation.
Error per severity = 1 − top-1; corruption error = mean over the severities; mCE = mean over the 19
corruptions, NOT normalised by AlexNet's errors. No clean-accuracy pass (as officially).

Output: per corruption ``=Average (e1, ..., e5)`` and ``Distortion: <name> | CE (unnormalized) (%): x``,
then ``mCE (unnormalized by AlexNet errors) (%): x``, a ``json:`` line and, with ``--output_dir``,
``imagenet_c.json``. Differences: ViT classifiers only (the official default ``--arch resnet50`` came
from the robustness library); ``--use_cuda``, ``--img_size``, ``--patch_size``, ``--linear_eval``,
``--num_workers``, ``--corruptions`` and ``--output_dir`` are additions; every corruption / severity
folder is checked before the first forward.
"""
import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ibot.eval.features import IMAGENET_MEAN, IMAGENET_STD
from ibot.eval.flags import backbone_parser, data_parser
from ibot.eval.robustness import (CORRUPTIONS, build_classifier, classifier_parser, corruption_error, count_correct,
                                  unnormalized_mce)
from ibot.utils.misc import fix_random_seeds

__all__ = ["get_args_parser", "main"]


def get_args_parser():
    """Official flags (``--data`` = ``--data_path``) plus the additions listed in the module docstring."""
    p = argparse.ArgumentParser("Evaluates robustness of various nets on ImageNet-C", parents=[
        backbone_parser(family="vit", window_size=None, pretrained_weights=False, checkpoint_key=None),
        data_parser("data/imnet_c", batch_size=32, batch_flag="--batch_size", num_workers=4), classifier_parser()])
    p.add_argument("--data", dest="data_path", default=argparse.SUPPRESS, help="official name of --data_path")
    p.add_argument("--ngpu", type=int, default=1, help="0 = CPU; > 1 = DataParallel")
    p.add_argument("--corruptions", default=list(CORRUPTIONS), nargs="+", choices=list(CORRUPTIONS))
    return p


def main(argv=None):
    """Returns ``{"errors": {corruption: [e1..e5]}, "ce": {corruption: mean}, "mce": fraction}``."""
    args = get_args_parser().parse_args(argv)
    missing = [os.path.join(args.data_path, c, str(s)) for c in args.corruptions for s in range(1, 6)
               if not os.path.isdir(os.path.join(args.data_path, c, str(s)))]
    if missing:
        raise FileNotFoundError(f"ImageNet-C folders missing, e.g. {missing[:3]} ({len(missing)} in all); expected "
                                f"<data>/<corruption>/<severity 1..5>/<wnid>/<image> under {args.data_path}")
    print(args)
    fix_random_seeds(1)
    device = torch.device("cuda" if args.use_cuda and args.ngpu > 0 and torch.cuda.is_available() else "cpu")
    net = build_classifier(args.arch, args.checkpoint, device, 1000, args.patch_size, args.linear_eval, args.img_size)
    if args.ngpu > 1 and device.type == "cuda":
        net = torch.nn.DataParallel(net, device_ids=list(range(args.ngpu)))
    tf = transforms.Compose([transforms.CenterCrop(args.img_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    errors, ce = {}, {}
    start = time.time()
    for i, name in enumerate(args.corruptions):
        errs = []
        for severity in range(1, 6):
            ds = datasets.ImageFolder(os.path.join(args.data_path, name, str(severity)), transform=tf)
            loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")
            correct, total = count_correct(net, loader, device)
            errs.append(1 - correct / total)
        errors[name], ce[name] = errs, corruption_error(errs)
        print("\n=Average", tuple(errs))
        print("Distortion: {:15s}  | CE (unnormalized) (%): {:.2f}".format(name, 100 * ce[name]))
        eta = (time.time() - start) / (i + 1) * (len(args.corruptions) - i - 1)
        print(f"[{i + 1}/{len(args.corruptions)}] eta {eta:.0f} s", flush=True)
    mce = unnormalized_mce(errors)
    print("mCE (unnormalized by AlexNet errors) (%): {:.2f}".format(100 * mce))
    record = {"errors": errors, "ce": ce, "mce": mce}
    print("json: " + json.dumps(record))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "imagenet_c.json"), "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
