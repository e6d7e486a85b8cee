"""The adversarial-backgrounds challenge of ImageNet-9 (official ``analysis/backgrounds_challenge/challenge_eval.py``,
evaluation.md §3.10; wrapper ``analysis/eval_bg_challenge.sh``).

    python analysis/backgrounds_challenge/challenge_eval.py --arch vit_small --checkpoint combined.pth \
        --data-path data/imnet_bg/bg_challenge [--use_cuda false]

For every foreground mask ``fg_mask/val/<class>/<name>.npy`` (image ``original/val/<class>/<name>.JPEG``)
the foreground is pasted onto every ``only_bg_t/val`` background (``bg·(1−m) + img·m``); the
foreground is *vulnerable* if any composite is classified as another class (1000-way predictions
mapped with ``in_to_in9.json``). The class of a foreground is the index of its folder in sorted
order. Output: progress every 50 foregrounds, ``Summary: v/n (x%) are vulnerable foregrounds.``,
``Challenge accuracy: 100 - x``, a ``json:`` line and, with ``--output_dir``, ``bg_challenge.json``.
Flags: those of ``in9_eval.py`` without ``--eval-dataset``.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ibot.eval.flags import backbone_parser, data_parser
from ibot.eval.robustness import classifier_parser, in9_classifier, in9_parser, is_vulnerable

__all__ = ["get_args_parser", "main", "MAPPING_FILE"]

MAPPING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "in_to_in9.json")


def get_args_parser():
    """The flags of ``in9_eval.py`` without ``--eval-dataset``."""
    return argparse.ArgumentParser("Backgrounds challenge", parents=[
        backbone_parser(family="vit", window_size=None, pretrained_weights=False, checkpoint_key=None),
        data_parser("data/imnet_bg/bg_challenge", batch_size=32, batch_flag="--batch_size", num_workers=8),
        classifier_parser(), in9_parser()])


def main(argv=None):
    """Returns ``{"vulnerable": int, "total": int, "percent_vulnerable": float, "challenge_accuracy": float}``."""
    args = get_args_parser().parse_args(argv)
    base = args.data_path
    fg_base = os.path.join(base, "fg_mask", "val")
    for need in (fg_base, os.path.join(base, "original", "val"), os.path.join(base, "only_bg_t", "val")):
        if not os.path.isdir(need):
            raise FileNotFoundError(f"{need} not found (expected the IN-9 layout fg_mask/val/<class>/*.npy, "
                                    f"original/val/<class>/*.JPEG, only_bg_t/val/<class>/*)")
    model, device, mapping = in9_classifier(args, MAPPING_FILE)
    bg = datasets.ImageFolder(os.path.join(base, "only_bg_t", "val"), transform=transforms.ToTensor())
    bg_loader = DataLoader(bg, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    class_names = sorted(os.listdir(fg_base))
    vulnerable = computed = 0
    start = time.time()
    for fg_class, name in enumerate(class_names):
        for mask_name in sorted(os.listdir(os.path.join(fg_base, name))):
            if computed % 50 == 0:
                print(f"At class {name}, {time.time() - start:.1f} s so far; {vulnerable}/{computed} vulnerable "
                      f"foregrounds.", flush=True)
            mask = np.load(os.path.join(fg_base, name, mask_name))
            mask = torch.from_numpy(np.clip(mask.astype(np.uint8), 0, 1)).float().expand(3, -1, -1)
            image_path = os.path.join(base, "original", "val", name, mask_name.replace("npy", "JPEG"))
            if not os.path.isfile(image_path):
                raise FileNotFoundError(f"foreground image of {mask_name} not found: {image_path}")
            with Image.open(image_path) as im:
                image = transforms.ToTensor()(im.convert("RGB"))
            hit = is_vulnerable(model, bg_loader, image, mask, fg_class, device, mapping)
            vulnerable += int(hit)
            computed += 1
    if computed == 0:
        raise FileNotFoundError(f"no foreground mask under {fg_base}")
    pct = 100.0 * vulnerable / computed
    print("Evaluation complete")
    print(f"Summary: {vulnerable}/{computed} ({pct:.2f}%) are vulnerable foregrounds.")
    print(f"Challenge accuracy: {100 - pct:.2f}%")
    record = {"vulnerable": vulnerable, "total": computed, "percent_vulnerable": pct,
              "challenge_accuracy": 100 - pct}
    print("json: " + json.dumps(record))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "bg_challenge.json"), "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
