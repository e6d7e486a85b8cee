"""DAVIS 2017 semi-supervised video object segmentation (official ``eval_video_segmentation.py``, §2.11).

Usage (run.sh ``davis_viseg``; one process, as officially)::

    python evaluation/eval_video_segmentation.py --arch vit_small --patch_size 16 \
        --pretrained_weights ckpt.pth --checkpoint_key teacher --data_path data/davis/DAVIS \
        --output_dir work_dirs/run/viseg [--use_cuda false]

Layout: ``<data_path>/ImageSets/2017/val.txt``, ``JPEGImages/480p/<video>/*.jpg``,
``Annotations/480p/<video>/*.png``. Propagation: :mod:`ibot.eval.video_segmentation` (context of
the first frame and the 7 previous ones, neighbourhood 12, top-k 5, temperature 0.1). Writes
``<output_dir>/<video>/<frame>.png`` (indexed, DAVIS palette), then scores them with the project's
J&F (:mod:`ibot.eval.davis_metrics`): prints the DAVIS table (J&F-Mean, J-Mean/Recall/Decay,
F-Mean/Recall/Decay, percent) and writes ``<output_dir>/davis_results.json``.

Differences from the official script: the palette is generated (the official script downloads it);
J&F is computed here instead of by a cloned davis2017-evaluation checkout (``--evaluate false`` skips
it); ``--temperature``, ``--scale_size`` (480 officially hard-coded), ``--videos``, ``--use_cuda`` and
``--evaluate`` are additions (``--num_workers``, common to the evaluation scripts, is unused: frames
are read one by one); a constant non-zero channel is not divided by zero in the min-max
normalisation; masks and frames share one size rule (the official one transposed square masks).
"""
import argparse
import json
import logging
import os
import time

import torch

from ibot.eval.davis_metrics import evaluate_davis
from ibot.eval.features import build_backbone
from ibot.eval.flags import backbone_parser, data_parser
from ibot.eval.video_segmentation import read_frame_list, read_video_list, segment_video
from ibot.eval.weights import load_pretrained_weights
from ibot.utils.misc import bool_flag, fix_random_seeds, print_run_header

__all__ = ["get_args_parser", "main"]


def get_args_parser(add_help=True):
    """Official flags plus ``--temperature``, ``--scale_size``, ``--videos``, ``--use_cuda``, ``--evaluate``."""
    p = argparse.ArgumentParser("Evaluation with video object segmentation on DAVIS 2017", add_help=add_help,
                                parents=[backbone_parser(family="vit", window_size=None),
                                         data_parser("/path/to/davis/", batch_size=None, num_workers=0)])
    p.add_argument("--output_dir", default=".", help="where the segmentations (and the J&F JSON) are written")
    p.add_argument("--n_last_frames", type=int, default=7, help="number of preceding frames in the context")
    p.add_argument("--size_mask_neighborhood", default=12, type=int, help="source window radius in patches")
    p.add_argument("--topk", type=int, default=5, help="affinities kept per target patch")
    p.add_argument("--bs", type=int, default=6, help="unused (official)")
    p.add_argument("--temperature", default=0.1, type=float, help="affinity temperature")
    p.add_argument("--scale_size", default=480, type=int, help="shorter frame side (official: 480)")
    p.add_argument("--videos", default=None, nargs="+", help="evaluate only these videos of the split")
    p.add_argument("--use_cuda", default=True, type=bool_flag)
    p.add_argument("--evaluate", default=True, type=bool_flag, help="compute J&F after the segmentation")
    return p


def main(argv=None):
    """Segment every video of the split, then score. Returns the J&F dict (or ``{}`` without --evaluate)."""
    args = get_args_parser().parse_args(argv)
    videos = read_video_list(args.data_path)
    if args.videos:
        unknown = sorted(set(args.videos) - set(videos))
        if unknown:
            raise SystemExit(f"--videos {unknown} are not listed in {args.data_path}/ImageSets/2017/val.txt")
        videos = [v for v in videos if v in args.videos]
    frames = {}
    for v in videos:   # check the whole layout before any work
        frames[v] = read_frame_list(os.path.join(args.data_path, "JPEGImages", "480p", v))
        first = os.path.join(args.data_path, "Annotations", "480p", v,
                             os.path.splitext(os.path.basename(frames[v][0]))[0] + ".png")
        if not os.path.isfile(first):
            raise FileNotFoundError(f"first-frame annotation not found: {first}")
    print_run_header(args)
    device = torch.device("cuda" if args.use_cuda and torch.cuda.is_available() else "cpu")
    fix_random_seeds(0)    # the same random initialisation on every rank when no weights are given
    model = build_backbone(args.arch, args.patch_size)
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    start = time.time()
    done, total = 0, sum(len(f) - 1 for f in frames.values())
    for i, v in enumerate(videos):
        print(f"[{i}/{len(videos)}] Begin to segment video {v}.", flush=True)
        first = os.path.join(args.data_path, "Annotations", "480p", v,
                             os.path.splitext(os.path.basename(frames[v][0]))[0] + ".png")

        def progress(t, n, _v=v):
            nonlocal done
            done += 1
            if t == n or t % 20 == 0:
                eta = (time.time() - start) / done * (total - done)
                print(f"  {_v}: frame {t}/{n}, eta {eta:.0f} s", flush=True)

        segment_video(model, frames[v], first, os.path.join(args.output_dir, v), args.patch_size,
                      args.n_last_frames, args.size_mask_neighborhood, args.topk, args.temperature,
                      args.scale_size, progress=progress)
    print(f"Segmentations written to {args.output_dir} ({time.time() - start:.0f} s)")
    if not args.evaluate:
        return {}
    res = evaluate_davis(args.data_path, args.output_dir, videos)
    names = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    print(" ".join(f"{n:>9s}" for n in names))
    print(" ".join(f"{100 * res[n]:9.1f}" for n in names))
    record = {"checkpoint_key": args.checkpoint_key, "videos": videos, **res}
    print("json: " + json.dumps({n: res[n] for n in names}))
    with open(os.path.join(args.output_dir, "davis_results.json"), "w") as f:
        json.dump(record, f, indent=1)
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
