"""Extract the backbone of a pre-training checkpoint (official top-level ``extract_backbone_weights.py``).

    python extract_backbone_weights.py checkpoint.pth backbone.pth --checkpoint_key teacher [--with_head true]

Official output (default ``--format official``): ``{'state_dict': {...}}`` where keys beginning with
``backbone.`` / ``module.backbone.`` lose that prefix and, with ``--with_head true``, every other
entry is kept with its key unchanged. Used by detection / segmentation configs.

``--format timm``: a flat state dict that ``timm.create_model(<name>, pretrained=False,
num_classes=0, **kwargs)`` loads with ``strict=True`` (name and kwargs are printed and written to
``<output>.timm.json``); ViT only. ``--num_heads`` is needed for non-standard widths.

Differences from the official script: files are read with weights-only loading; a missing
``--checkpoint_key`` or a checkpoint without backbone keys is an error (the official script printed a
notice and saved an empty file); the output is written atomically.
"""
import argparse
import json

from ibot.utils.checkpoint import atomic_save
from ibot.eval.export import ExportError, export_timm, extract_backbone, load_entry
from ibot.utils.misc import bool_flag


def get_args_parser():
    """Official positional ``pretrained_weights output_file``, ``--checkpoint_key``, ``--with_head``; plus ``--format``."""
    p = argparse.ArgumentParser("Extract backbone state dict")
    p.add_argument("checkpoint", type=str, help="path to the pre-training checkpoint")
    p.add_argument("output", type=str, help="destination file name (.pth)")
    p.add_argument("--checkpoint_key", default="state_dict", type=str, help="e.g. teacher or student")
    p.add_argument("--with_head", default=False, type=bool_flag, help="keep the projection-head entries")
    p.add_argument("--format", default="official", choices=["official", "timm"],
                   help="official {'state_dict': ...} file, or a flat timm ViT state dict")
    p.add_argument("--num_heads", default=None, type=int, help="(timm) attention heads, default width/64")
    return p


def main(args):
    """Write the extracted file; returns the saved object (dict)."""
    if not args.output.endswith(".pth"):
        raise ExportError(f"output file must end with .pth: {args.output}")
    if args.format == "timm":
        state_dict, config = export_timm(args.checkpoint, args.checkpoint_key, args.num_heads)
        atomic_save(state_dict, args.output)
        with open(args.output + ".timm.json", "w") as f:
            json.dump(config, f, indent=2)
        print(f"timm state dict ({len(state_dict)} tensors) saved to {args.output}; load it with "
              f"timm.create_model({config['model_name']!r}, pretrained=False, **{config['kwargs']}) "
              f"and load_state_dict(strict=True)")
        return state_dict
    _, entry = load_entry(args.checkpoint, args.checkpoint_key)
    state_dict, n_backbone = extract_backbone(entry, args.with_head)
    if n_backbone == 0:
        raise ExportError(f"no backbone keys (backbone.* / module.backbone.*) in {args.checkpoint}"
                          f"[{args.checkpoint_key!r}]; keys look like {list(entry)[:5]}")
    out = {"state_dict": state_dict}
    atomic_save(out, args.output)
    print(f"{n_backbone} backbone tensors" + (f" + {len(state_dict) - n_backbone} head tensors" if args.with_head else "")
          + f" saved to {args.output}")
    return out


if __name__ == "__main__":
    parser = get_args_parser()
    try:
        main(parser.parse_args())
    except (ExportError, FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        # unsafe, corrupt or foreign files: one clear line, no traceback (nothing was written)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
