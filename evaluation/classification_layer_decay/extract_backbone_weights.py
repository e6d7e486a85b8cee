"""Extract a FLAT backbone state dict (official ``classification_layer_decay/extract_backbone_weights.py``).

    python evaluation/classification_layer_decay/extract_backbone_weights.py checkpoint.pth out.pth --checkpoint_key teacher

Keys beginning with ``backbone.`` / ``module.backbone.`` lose that prefix; all other entries are
dropped. The output is the flat dict (no ``state_dict`` wrapper). Raises if there is no backbone key
or the key is missing. Used by the ImageNet fine-tuning path.
"""
import argparse

from ibot.utils.checkpoint import atomic_save
from ibot.eval.export import ExportError, extract_backbone, load_entry


def get_args_parser():
    """Official positional ``checkpoint output`` and ``--checkpoint_key`` (default ``state_dict``)."""
    p = argparse.ArgumentParser("Extract backbone state dict (flat)")
    p.add_argument("checkpoint", type=str, help="path to the pre-training checkpoint")
    p.add_argument("output", type=str, help="destination file name (.pth)")
    p.add_argument("--checkpoint_key", default="state_dict", type=str, help="e.g. teacher or student")
    return p


def main(args):
    """Write the flat backbone dict to ``args.output`` and return it."""
    if not args.output.endswith(".pth"):
        raise ExportError(f"output file must end with .pth: {args.output}")
    _, entry = load_entry(args.checkpoint, args.checkpoint_key)
    state_dict, n_backbone = extract_backbone(entry, with_head=False)
    if n_backbone == 0:
        raise ExportError(f"no backbone keys (backbone.* / module.backbone.*) in {args.checkpoint}"
                          f"[{args.checkpoint_key!r}]")
    atomic_save(state_dict, args.output)
    print(f"{n_backbone} backbone tensors saved to {args.output}")
    return state_dict


if __name__ == "__main__":
    main(get_args_parser().parse_args())
