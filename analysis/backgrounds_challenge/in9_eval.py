"""ImageNet-9 background variations and the BG-Gap (official ``analysis/backgrounds_challenge/in9_eval.py``,
evaluation.md §3.10; wrapper ``analysis/eval_bg_challenge.sh``).

    python analysis/backgrounds_challenge/in9_eval.py --arch vit_small --checkpoint combined.pth \
        --data-path data/imnet_bg/bg_challenge [--eval-dataset mixed_same] [--use_cuda false]

Layout: ``<data-path>/<variation>/val/<class>/*`` for the variations ``mixed_next``, ``mixed_rand``,
``mixed_same``, ``no_fg``, ``only_bg_b``, ``only_bg_t``, ``only_fg``, ``original`` (and
``fg_mask/val/<class>/*.npy`` for the challenge). Images are already 224 px: ToTensor only; the
classifier is wrapped to clamp to [0, 1] and normalise. A 1000-way prediction is mapped to IN-9 with
``in_to_in9.json`` (−1 counts as wrong); ``--in9`` evaluates a 9-class model directly.

Output: ``Accuracy on <variation> is x%`` for each variation, ``BG-Gap (mixed_same - mixed_rand): x``
when both were evaluated, a ``json:`` line and, with ``--output_dir``, ``in9.json``.
Differences: the official script evaluates every sub-folder except the first in sorted order
(assuming it is ``fg_mask``); here every IN-9 variation present is evaluated by name (``fg_mask`` and
other folders are ignored) and BG-Gap is computed; ViT classifiers only; ``--use_cuda``,
``--patch_size``, ``--img_size``, ``--linear_eval``, ``--num_workers``, ``--output_dir`` are additions.
"""
import argparse
import json
import os

from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ibot.eval.flags import backbone_parser, data_parser
from ibot.eval.robustness import IN9_VARIATIONS, bg_gap, classifier_parser, count_correct, in9_classifier, in9_parser

__all__ = ["get_args_parser", "main", "MAPPING_FILE"]

MAPPING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "in_to_in9.json")


def get_args_parser():
    """Official flags (``--data-path`` = ``--data_path``, ``--in9``, ``--eval-dataset``) plus the additions."""
    p = argparse.ArgumentParser("ImageNet-9 variations", parents=[
        backbone_parser(family="vit", window_size=None, pretrained_weights=False, checkpoint_key=None),
        data_parser("data/imnet_bg/bg_challenge", batch_size=32, batch_flag="--batch_size", num_workers=8),
        classifier_parser(), in9_parser()])
    p.add_argument("--eval-dataset", "--eval_dataset", dest="eval_dataset", default=None,
                   help="one variation (default: every variation found)")
    return p


def main(argv=None):
    """Returns ``{"accuracy": {variation: percent}, "bg_gap": percent or None}``."""
    args = get_args_parser().parse_args(argv)
    wanted = [args.eval_dataset] if args.eval_dataset else list(IN9_VARIATIONS)
    found = [v for v in wanted if os.path.isdir(os.path.join(args.data_path, v, "val"))]
    if not found or (args.eval_dataset and args.eval_dataset not in found):
        raise FileNotFoundError(f"no IN-9 variation {wanted} under {args.data_path} (expected "
                                f"<data-path>/<variation>/val/<class>/<image>, variations {list(IN9_VARIATIONS)})")
    model, device, mapping = in9_classifier(args, MAPPING_FILE)
    acc = {}
    for v in found:
        ds = datasets.ImageFolder(os.path.join(args.data_path, v, "val"), transform=transforms.ToTensor())
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
        correct, total = count_correct(model, loader, device, mapping)
        acc[v] = 100.0 * correct / total
        print(f"Accuracy on {v} is {acc[v]:.2f}%", flush=True)
    gap = bg_gap(acc) if "mixed_same" in acc and "mixed_rand" in acc else None
    if gap is not None:
        print(f"BG-Gap (mixed_same - mixed_rand): {gap:.2f}")
    record = {"accuracy": acc, "bg_gap": gap}
    print("json: " + json.dumps(record))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "in9.json"), "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
