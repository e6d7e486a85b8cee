"""Both codebases trained in lock step on the same recorded batches (a bisection step of issue 19).

Draws ``--epochs`` x ``--steps_per_epoch`` batches of the calibration recipe once (this repository's
pipeline and masks, ``ibot.train.driver.build_dataset``), builds the official student and teacher of
``--seed`` (through ``../shared/tools/official/run_official.py``; this repository's networks start from
the same state dict, which is what both draw from one seed), and trains each side's
``train_one_epoch`` (the official one unchanged, this repository's with the official signature) on
exactly those batches, epoch after epoch, with drop path off (the one random draw inside a step, made
with different calls by the two codebases). After every epoch it prints both sides' averaged loss
terms and the largest differences of the teacher weights and of the centres. If the trajectories
coincide, the gap between free-running seeds (``docs/learning_parity.md``) comes from the random
streams; if they part, the first epoch where they do points at the cause::

    IBOT_REF=$HOME/.cache/ibot_ref PYTHONPATH=$HOME/.cache/offdeps OMP_NUM_THREADS=1 \\
        python benchmarks/lockstep_parity.py --data_path runs/parity10/fmnist32_300_100_ours/train --epochs 4
"""
import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), REPO]
from learning_parity import HARNESS, OFFICIAL_SIZES, OURS_SIZES, RECIPE  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("iBOT: both codebases in lock step on recorded batches")
    p.add_argument("--data_path", required=True, help="ImageFolder (the parity runs' train/ folder)")
    p.add_argument("--epochs", type=int, default=4, help="epochs trained in lock step")
    p.add_argument("--total_epochs", type=int, default=10, help="epochs of the schedules (the recipe's)")
    p.add_argument("--steps_per_epoch", type=int, default=46, help="batches per epoch (46 = 3000 images / 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_step", default="reference", choices=("reference", "fast"), help="our step")
    p.add_argument("--harness", default=HARNESS)
    p.add_argument("--out_json", default="")
    return p


def record_batches(ours_args, n_epochs, steps, seed):
    """``n_epochs`` lists of ``steps`` batches ``(crops, labels, masks)`` of this repository's pipeline."""
    from ibot.train.driver import build_dataset
    dataset = build_dataset(ours_args)
    epochs = []
    for e in range(n_epochs):
        dataset.set_epoch(e)
        loader = torch.utils.data.DataLoader(dataset, batch_size=ours_args.batch_size_per_gpu, shuffle=True,
                                             drop_last=True, num_workers=0,
                                             generator=torch.Generator().manual_seed(seed * 1000 + e))
        batches = []
        for images, labels, masks, *_ in loader:
            batches.append((images, labels, masks))
            if len(batches) == steps:
                break
        epochs.append(batches)
    return epochs


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv=None):
    a = get_args_parser().parse_args(argv)
    from ibot.train.context import make_context
    from ibot.train.driver import build_networks, build_optimization
    from ibot.train.epoch import train_one_epoch as ours_epoch
    from ibot.train.flags import get_args_parser as ours_parser
    common = RECIPE + ["--epochs", str(a.total_epochs), "--seed", str(a.seed), "--drop_path", "0",
                       "--data_path", a.data_path, "--output_dir", "/tmp/lockstep", "--num_workers", "0"]
    oa = ours_parser().parse_args(common + OURS_SIZES + ["--train_step", a.train_step])
    batches = record_batches(oa, a.epochs, a.steps_per_epoch, a.seed)
    print(f"recorded {a.epochs} x {len(batches[0])} batches of {oa.batch_size_per_gpu}", flush=True)

    sys.path.insert(0, os.path.dirname(a.harness))
    import run_official  # after every import of this repository: it takes the official modules' names
    run_official.load_official()
    run_official.init_dist()
    O = run_official.O
    fa = run_official.build_parser().parse_args(["pretrain"] + common + OFFICIAL_SIZES)
    O.utils.fix_random_seeds(a.seed)
    o_student, o_teacher, o_teacher_wo = run_official.build_networks(fa, ddp=True)
    o_loss = run_official.build_loss(fa)
    o_opt = run_official.build_optimizer(fa, o_student)
    o_sched = run_official.build_schedules(fa, a.steps_per_epoch)

    ctx = make_context(oa, precision="fp32")
    u_student, u_teacher = build_networks(oa)
    u_student.load_state_dict(o_student.module.state_dict())
    u_teacher.load_state_dict(o_teacher_wo.state_dict())
    for p in u_teacher.parameters():
        p.requires_grad = False
    u_loss, u_opt, _, u_sched = build_optimization(u_student, oa, ctx, a.steps_per_epoch)
    assert _max_diff(u_teacher.state_dict(), o_teacher_wo.state_dict()) == 0.0

    rows = []
    for epoch in range(a.epochs):
        loader = run_official.TimedBatches(batches[epoch])
        o_stats = run_official.run_official_epoch(o_student, o_teacher, o_teacher_wo, o_loss, loader, o_opt,
                                                  o_sched, epoch, fa, quiet=True)
        u_stats = ours_epoch(u_student, u_teacher, u_teacher, u_loss, batches[epoch], u_opt, *u_sched, epoch,
                             None, oa)
        row = {"epoch": epoch + 1,
               "official": {k: float(o_stats[k]) for k in ("loss", "cls", "patch", "acc")},
               "ours": {k: float(u_stats[k]) for k in ("loss", "cls", "patch", "acc")},
               "teacher_max_abs_diff": _max_diff(u_teacher.state_dict(), o_teacher_wo.state_dict()),
               "student_max_abs_diff": _max_diff(u_student.state_dict(), o_student.module.state_dict()),
               "center_max_abs_diff": float((u_loss.center - o_loss.center).abs().max()),
               "center2_max_abs_diff": float((u_loss.center2 - o_loss.center2).abs().max())}
        rows.append(row)
        print(f"epoch {epoch + 1}: cls official {row['official']['cls']:.6f} ours {row['ours']['cls']:.6f} | "
              f"patch {row['official']['patch']:.6f} / {row['ours']['patch']:.6f} | max |diff| teacher "
              f"{row['teacher_max_abs_diff']:.2e} student {row['student_max_abs_diff']:.2e} centre "
              f"{row['center_max_abs_diff']:.2e}", flush=True)
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump({"seed": a.seed, "steps_per_epoch": a.steps_per_epoch, "train_step": a.train_step,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
