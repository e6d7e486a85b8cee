"""One network, two data pipelines: the iBOT loss terms on this repository's crops and masks vs the
official ones (a bisection step of issue 19).

Loads a pre-training checkpoint (either codebase's: ``args``, ``student``, ``teacher``, ``ibot_loss``),
then draws ``--batches`` batches from the same ImageFolder twice: with this repository's pre-training
dataset (``ibot.train.driver.build_dataset``: multi-crop transform of ``--data_pipeline`` and the
per-sample seeded masks) and with the official one (``loader.ImageFolderMask`` +
``DataAugmentationiBOT`` of the official checkout, through ``../shared/tools/official/run_official.py``,
the crop sizes set as that harness sets them). Each batch goes through the same frozen student and
teacher and the official ``iBOTLoss`` with the checkpoint's centres (not updated) and the teacher
temperatures of ``--epoch``. A difference of the mean [CLS] or patch term beyond its standard error
says that the pipelines draw different distributions; no difference says that a gap between training
runs comes from the training itself::

    IBOT_REF=$HOME/.cache/ibot_ref PYTHONPATH=$HOME/.cache/offdeps python benchmarks/pipeline_loss.py \\
        --checkpoint runs/parity10/ours_s2/checkpoint.pth --data_path data/fmnist32/train --batches 100
"""
import argparse
import json
import math
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.normpath(os.path.join(REPO, "..", "shared", "tools", "official", "run_official.py"))


def get_args_parser():
    p = argparse.ArgumentParser("iBOT loss terms of one network on both codebases' pipelines")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth with args, student, teacher, ibot_loss")
    p.add_argument("--data_path", required=True, help="ImageFolder (the run's training images)")
    p.add_argument("--batches", type=int, default=100, help="batches per pipeline")
    p.add_argument("--epoch", type=int, default=None, help="temperature epoch (default: the checkpoint's last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--harness", default=HARNESS)
    p.add_argument("--out_json", default="")
    return p


def load_networks(ckpt, args):
    """Student and teacher of this repository's construction with the checkpoint's weights, frozen."""
    from ibot.train.driver import build_networks
    student, teacher = build_networks(args)
    for net, key in ((student, "student"), (teacher, "teacher")):
        net.load_state_dict({k.removeprefix("module."): v for k, v in ckpt[key].items()})
        net.eval()
    return student, teacher


@torch.no_grad()
def loss_terms(student, teacher, loss_fn, centres, dataset, batch_size, batches, ng, epoch, seed):
    """Per batch ``(cls, patch)`` of the official loss on ``dataset``'s crops and masks; passes over the
    data as often as ``batches`` needs, each with its own ``set_epoch`` (this repository seeds the
    crops of a sample per epoch)."""
    from ibot.models.wrapper import unmasked
    out, rep = [], 0
    while len(out) < batches:
        dataset.set_epoch(epoch + rep)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                             num_workers=0, generator=torch.Generator().manual_seed(seed + rep))
        for images, _, masks, *_ in loader:
            t_out = teacher(images[:ng])
            s_out = student(images[:ng], mask=masks[:ng])
            with unmasked(student.backbone):
                s_local = student(images[ng:])[0] if len(images) > ng else None
            loss_fn.center, loss_fn.center2 = centres[0].clone(), centres[1].clone()
            terms = loss_fn(s_out, t_out, s_local, [m.bool() for m in masks[:ng]], epoch)
            out.append((float(terms["cls"]), float(terms["patch"])))
            if len(out) == batches:
                break
        rep += 1
    return out


def _mean_se(values):
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def main(argv=None):
    a = get_args_parser().parse_args(argv)
    for flag, path in (("--checkpoint", a.checkpoint), ("--harness", a.harness)):
        if not os.path.isfile(path):
            raise SystemExit(f"{flag} {path}: no such file")
    from ibot.train.driver import build_dataset
    from ibot.train.flags import complete_args
    from ibot.utils.checkpoint import safe_load
    ckpt = safe_load(a.checkpoint)
    args = argparse.Namespace(**{"seed": a.seed, **vars(ckpt["args"]), "data_path": a.data_path})
    if not hasattr(args, "global_crops_size"):  # the official harness names them global_size / local_size
        args.global_crops_size, args.local_crops_size = args.global_size, args.local_size
    args = complete_args(args)  # an official checkpoint's args lack this repository's other flags
    student, teacher = load_networks(ckpt, args)
    ours = build_dataset(args)
    epoch = min(a.epoch if a.epoch is not None else int(ckpt["epoch"]) - 1, args.epochs - 1)
    centres = (ckpt["ibot_loss"]["center"].float(), ckpt["ibot_loss"]["center2"].float())

    sys.path.insert(0, os.path.dirname(a.harness))
    import run_official  # after every import of this repository: it takes the official modules' names
    run_official.load_official()
    run_official.init_dist()
    O = run_official.O
    off_args = argparse.Namespace(**vars(args), global_size=args.global_crops_size, local_size=args.local_crops_size)
    official = O.loader.ImageFolderMask(
        a.data_path, transform=run_official.build_transform(off_args), patch_size=args.patch_size,
        pred_ratio=args.pred_ratio, pred_ratio_var=args.pred_ratio_var, pred_aspect_ratio=(0.3, 1 / 0.3),
        pred_shape=args.pred_shape, pred_start_epoch=args.pred_start_epoch)
    same_dim = args.shared_head or args.shared_head_teacher
    loss_fn = O.main_ibot.iBOTLoss(args.out_dim, args.out_dim if same_dim else args.patch_out_dim,
                                   args.global_crops_number, args.local_crops_number, args.warmup_teacher_temp,
                                   args.teacher_temp, args.warmup_teacher_patch_temp, args.teacher_patch_temp,
                                   args.warmup_teacher_temp_epochs, args.epochs, lambda1=args.lambda1,
                                   lambda2=args.lambda2, mim_start_epoch=args.pred_start_epoch)
    result = {"checkpoint": a.checkpoint, "epoch": epoch, "batches": a.batches,
              "batch_size": args.batch_size_per_gpu}
    for name, dataset in (("ours", ours), ("official", official)):
        torch.manual_seed(a.seed)  # the official transforms draw from the global RNGs
        rows = loss_terms(student, teacher, loss_fn, centres, dataset, args.batch_size_per_gpu, a.batches,
                          args.global_crops_number, epoch, a.seed)
        (cm, cse), (pm, pse) = _mean_se([r[0] for r in rows]), _mean_se([r[1] for r in rows])
        result[name] = {"cls_mean": cm, "cls_se": cse, "patch_mean": pm, "patch_se": pse, "rows": rows}
        print(f"{name:8s} pipeline: cls {cm:.4f} ± {cse:.4f} (s.e.), patch {pm:.4f} ± {pse:.4f} over {len(rows)} batches")
    # both loaders shuffle with the same generator seeds: batch i holds the same images on both sides,
    # so the per-batch differences are paired (image content cancels)
    for j, term in enumerate(("cls", "patch")):
        diffs = [o[j] - f[j] for o, f in zip(result["ours"]["rows"], result["official"]["rows"])]
        d, se = _mean_se(diffs)
        result[f"{term}_diff"] = {"ours_minus_official": d, "se_paired": se}
        print(f"{term}: ours - official = {d:+.4f} ± {se:.4f} (s.e. of the paired batch differences)")
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
