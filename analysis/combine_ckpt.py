"""Merge a backbone and the best linear head of a linear-probe sweep into one classifier checkpoint
(official ``analysis/combine_ckpt.py``, evaluation.md §3.6).

    python analysis/combine_ckpt.py --checkpoint_backbone backbone.pth \
        --checkpoint_linear out/linear/checkpoint_teacher_linear.pth --output_file classifier.pth

``--checkpoint_backbone``: a backbone file (``{'state_dict': ...}`` of the top-level extract script,
or flat, or a full pre-training checkpoint with ``--checkpoint_key``); wrapper prefixes are removed
and projection-head entries dropped. ``--checkpoint_linear``: an ``eval_linear_multi`` checkpoint
(``state_dict`` keys ``<i>.module.linear.*``, ``best_acc_hidx``) or an ``eval_linear`` one
(``module.linear.*``). The head ``best_acc_hidx`` is copied as ``linear.weight``/``linear.bias`` next
to the backbone keys; the linear checkpoint dict is saved with its ``state_dict`` replaced by the
merged dict (``epoch``, ``best_acc``... kept), which :mod:`analysis.imagenet_models` and the
robustness tools read.
"""
import argparse
import os

from ibot.utils.checkpoint import atomic_save, safe_load
from ibot.eval.weights import backbone_state_dict, select_state_dict

__all__ = ["get_args_parser", "combine", "main"]


def get_args_parser():
    """The three official (required) flags plus ``--checkpoint_key`` for full checkpoints."""
    p = argparse.ArgumentParser("Combine a backbone and a linear head")
    p.add_argument("--checkpoint_backbone", required=True, type=str)
    p.add_argument("--checkpoint_linear", required=True, type=str)
    p.add_argument("--output_file", required=True, type=str)
    p.add_argument("--checkpoint_key", default=None, type=str,
                   help="entry of a full pre-training checkpoint (teacher/student); default: auto-detect")
    return p


def combine(backbone_ckpt, linear_ckpt, checkpoint_key=None, source="backbone"):
    """Merge two loaded checkpoints.

    Args:
        backbone_ckpt: loaded backbone file (dict); linear_ckpt: loaded linear-probe checkpoint (dict).
    Returns:
        (merged checkpoint dict, head index used or None for a single-head file).
    """
    sd, _ = select_state_dict(backbone_ckpt, checkpoint_key, source=source)
    merged, _ = backbone_state_dict(sd)
    lin = linear_ckpt["state_dict"]
    hidx = linear_ckpt.get("best_acc_hidx")
    prefix = f"{hidx}.module." if hidx is not None else "module."
    head = {k[len(prefix):]: v for k, v in lin.items() if k.startswith(prefix)}
    if not head and hidx is None:  # single head saved without DDP prefix
        head = {k: v for k, v in lin.items() if k.startswith("linear.")}
    if set(head) != {"linear.weight", "linear.bias"}:
        raise KeyError(f"head {hidx} not found in the linear checkpoint (expected {prefix}linear.weight/bias; "
                       f"keys: {sorted(lin)[:6]}...)")
    clash = [k for k in head if k in merged]
    if clash:
        raise KeyError(f"the backbone already has keys {clash}")
    merged.update(head)
    out = dict(linear_ckpt)
    out["state_dict"] = merged
    return out, hidx


def main(argv=None):
    """Run the tool; returns the merged checkpoint dict (also written to ``--output_file``)."""
    args = get_args_parser().parse_args(argv)
    linear = safe_load(args.checkpoint_linear)
    out, hidx = combine(safe_load(args.checkpoint_backbone), linear, args.checkpoint_key, args.checkpoint_backbone)
    folder = os.path.dirname(os.path.abspath(args.output_file))
    os.makedirs(folder, exist_ok=True)
    atomic_save(out, args.output_file)
    print(f"Use head {hidx if hidx is not None else 0} with accuracy {linear.get('best_acc')}; "
          f"saved {len(out['state_dict'])} tensors to {args.output_file}")
    return out


if __name__ == "__main__":
    main()
