"""Effect of the official fp16 loss arithmetic, beside this repository's fp32 arithmetic (issue 19).

Under ``--use_fp16 true`` the official code calls its ``iBOTLoss`` inside CUDA autocast with the fp16
outputs of the heads. Autocast's op lists decide which operations of that loss then run in fp16:
``softmax``, ``log_softmax`` and ``sum`` are on its float32 list, and a subtraction of the fp32 centre
buffers promotes to fp32, so only two operations stay in fp16: the student logits divided by the
student temperature (``student_cls / 0.1``, ``student_patch / 0.1``) and each image's mean teacher
patch logit of the centre update (``teacher_patch.mean(1)``). This repository casts the head outputs
to fp32 before any loss arithmetic. Both sides share the rounding of the fp16 head outputs.

The benchmark measures that difference on real outputs without a GPU: it loads a pre-training
checkpoint of this repository, draws batches of its data with its pipeline and masks, computes the
student and teacher head outputs in fp32 and rounds them to fp16 (what an fp16 head returns, up to
the head's own fp16 arithmetic), then evaluates the *official* ``iBOTLoss`` (imported from the
official checkout through ``../shared/tools/official/run_official.py``) three ways, each from the
checkpoint's centres:

* ``fp32``: on the fp32 outputs (reference);
* ``ours``: on the fp16-rounded outputs in fp32 arithmetic (this repository under fp16 autocast);
* ``official_fp16``: on the fp16 outputs in fp16 tensors, with ``softmax``, ``log_softmax`` and
  ``sum`` run in fp32 as CUDA autocast runs them (the official code under fp16 autocast).

Per batch it prints the loss terms, the relative difference of the gradients with respect to the
student outputs and of the updated centres, and the same figures for the rounding that both sides
share (``ours`` vs ``fp32``); then medians over the batches, also into ``--out_json``::

    IBOT_REF=$HOME/.cache/ibot_ref PYTHONPATH=$HOME/.cache/offdeps python benchmarks/loss_precision.py \\
        --checkpoint runs/parity10/ours_s2/checkpoint.pth --data_path data/fmnist32/train --batches 8
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import types

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.normpath(os.path.join(REPO, "..", "shared", "tools", "official", "run_official.py"))
GRAD_SCALE = 2.0 ** 16  # torch.cuda.amp.GradScaler's initial scale
INPUTS = ("student_cls", "student_patch", "teacher_cls", "teacher_patch", "student_local_cls")


def get_args_parser():
    p = argparse.ArgumentParser("fp16 loss arithmetic of the official code vs fp32 (CPU emulation of autocast)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth of main_ibot.py (args, student, teacher, ibot_loss)")
    p.add_argument("--data_path", default=None, help="ImageFolder of the run (default: the checkpoint's --data_path)")
    p.add_argument("--batches", type=int, default=8, help="batches measured")
    p.add_argument("--epoch", type=int, default=None, help="temperature-schedule epoch (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--harness", default=HARNESS, help="run_official.py (imports the official code from $IBOT_REF)")
    p.add_argument("--out_json", default="", help="write the per-batch figures and medians here")
    return p


@torch.no_grad()
def head_outputs(checkpoint, data_path, batches, seed):
    """fp32 head outputs of ``batches`` batches: a list of dicts of ``INPUTS`` tensors plus ``masks``."""
    from ibot.train.driver import build_dataset, build_networks
    from ibot.utils.checkpoint import safe_load
    from ibot.models.wrapper import unmasked
    ckpt = safe_load(checkpoint)
    args = argparse.Namespace(**vars(ckpt["args"]))
    args.data_path = data_path or args.data_path
    student, teacher = build_networks(args)
    for net, key in ((student, "student"), (teacher, "teacher")):
        net.load_state_dict({k.removeprefix("module."): v for k, v in ckpt[key].items()})
        net.eval()
    dataset = build_dataset(args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    ng, out = args.global_crops_number, []
    for images, _, masks, *_ in loader:
        t_cls, t_patch = teacher(images[:ng])
        s_cls, s_patch = student(images[:ng], mask=masks[:ng])
        s_local = None
        if len(images) > ng:
            with unmasked(student.backbone):
                s_local = student(images[ng:])[0]
        out.append(dict(student_cls=s_cls, student_patch=s_patch, teacher_cls=t_cls, teacher_patch=t_patch,
                        student_local_cls=s_local, masks=[m.bool() for m in masks[:ng]]))
        if len(out) == batches:
            break
    return args, ckpt, out


@contextlib.contextmanager
def cuda_autocast_fp32_ops(module):
    """While the official loss runs: ``F.softmax``, ``F.log_softmax`` and ``torch.sum`` of fp16 tensors
    compute in fp32, as they do under CUDA autocast (its float32 op list); all else is unchanged."""
    def up(x):
        return x.float() if torch.is_tensor(x) and x.dtype == torch.float16 else x

    shim_f = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    shim_f.softmax = lambda x, *a, **k: F.softmax(up(x), *a, **k)
    shim_f.log_softmax = lambda x, *a, **k: F.log_softmax(up(x), *a, **k)
    real_sum = torch.sum
    saved_f = module.F
    module.F = shim_f
    torch.sum = lambda x, *a, **k: real_sum(up(x), *a, **k)
    try:
        yield
    finally:
        module.F = saved_f
        torch.sum = real_sum


def official_loss(O, args, centres, batch, leaf_dtype, dtype, epoch, emulate_autocast):
    """Loss terms, student-output gradients and updated centres of the official ``iBOTLoss`` on the
    outputs held as ``leaf_dtype`` tensors (the heads' dtype; their gradients come back in it) and
    cast to ``dtype`` for the loss arithmetic."""
    same_dim = args.shared_head or args.shared_head_teacher
    loss_fn = O.main_ibot.iBOTLoss(args.out_dim, args.out_dim if same_dim else args.patch_out_dim,
                                   args.global_crops_number, args.local_crops_number, args.warmup_teacher_temp,
                                   args.teacher_temp, args.warmup_teacher_patch_temp, args.teacher_patch_temp,
                                   args.warmup_teacher_temp_epochs, args.epochs, lambda1=args.lambda1,
                                   lambda2=args.lambda2, mim_start_epoch=args.pred_start_epoch)
    loss_fn.center, loss_fn.center2 = centres[0].clone(), centres[1].clone()
    inp, leaves = {}, {}
    for k in INPUTS:
        v = batch[k]
        if v is not None:
            leaf = v.to(leaf_dtype).detach().requires_grad_(k.startswith("student"))
            leaves[k] = leaf
            v = leaf.to(dtype)
        inp[k] = v
    ctx = cuda_autocast_fp32_ops(O.main_ibot) if emulate_autocast else contextlib.nullcontext()
    with ctx:
        out = loss_fn((inp["student_cls"], inp["student_patch"]), (inp["teacher_cls"], inp["teacher_patch"]),
                      inp["student_local_cls"], batch["masks"], epoch)
    (out["loss"] * GRAD_SCALE).backward()  # as the official GradScaler does, so fp16 gradients do not underflow
    grads = torch.cat([leaves[k].grad.double().flatten() / GRAD_SCALE for k in INPUTS if k.startswith("student") and k in leaves])
    return ({k: float(v.detach()) for k, v in out.items()}, grads,
            torch.cat([loss_fn.center.float().flatten(), loss_fn.center2.float().flatten()]))


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compare(O, args, centres, batch, epoch):
    """Figures of one batch: loss terms of the three variants and the relative differences."""
    half, full = torch.float16, torch.float32
    ref_l, ref_g, ref_c = official_loss(O, args, centres, batch, full, full, epoch, False)
    our_l, our_g, our_c = official_loss(O, args, centres, batch, half, full, epoch, False)
    off_l, off_g, off_c = official_loss(O, args, centres, batch, half, half, epoch, True)
    return {"loss": {"fp32": ref_l, "ours": our_l, "official_fp16": off_l},
            "official_fp16_vs_ours": {"loss_abs": abs(off_l["loss"] - our_l["loss"]),
                                      "cls_abs": abs(off_l["cls"] - our_l["cls"]),
                                      "patch_abs": abs(off_l["patch"] - our_l["patch"]),
                                      "grad_rel": _rel(off_g, our_g),
                                      "grad_cos": float(F.cosine_similarity(off_g, our_g, dim=0)),
                                      "centre_rel": _rel(off_c, our_c)},
            "ours_vs_fp32": {"loss_abs": abs(our_l["loss"] - ref_l["loss"]),
                             "cls_abs": abs(our_l["cls"] - ref_l["cls"]),
                             "patch_abs": abs(our_l["patch"] - ref_l["patch"]),
                             "grad_rel": _rel(our_g, ref_g),
                             "grad_cos": float(F.cosine_similarity(our_g, ref_g, dim=0)),
                             "centre_rel": _rel(our_c, ref_c)}}


def main(argv=None):
    a = get_args_parser().parse_args(argv)
    if not os.path.isfile(a.checkpoint):
        raise SystemExit(f"--checkpoint {a.checkpoint}: no such file")
    if not os.path.isfile(a.harness):
        raise SystemExit(f"--harness {a.harness}: no such file (the official harness, ../shared/tools/official)")
    torch.manual_seed(a.seed)
    args, ckpt, batches = head_outputs(a.checkpoint, a.data_path, a.batches, a.seed)
    epoch = min(a.epoch if a.epoch is not None else int(ckpt["epoch"]), args.epochs - 1)
    centres = (ckpt["ibot_loss"]["center"].float(), ckpt["ibot_loss"]["center2"].float())
    sys.path.insert(0, os.path.dirname(a.harness))
    import run_official  # after every import of this repository: it takes the official modules' names
    run_official.load_official()
    run_official.init_dist()
    rows = [compare(run_official.O, args, centres, b, epoch) for b in batches]
    for i, r in enumerate(rows):
        d, s = r["official_fp16_vs_ours"], r["ours_vs_fp32"]
        print(f"batch {i}: loss fp32 {r['loss']['fp32']['loss']:.6f}, ours {r['loss']['ours']['loss']:.6f}, "
              f"official fp16 {r['loss']['official_fp16']['loss']:.6f} | official fp16 vs ours: |dL| "
              f"{d['loss_abs']:.2e}, grad rel {d['grad_rel']:.2e} (cos {d['grad_cos']:.6f}), centre rel "
              f"{d['centre_rel']:.2e} | shared fp16 output rounding: |dL| {s['loss_abs']:.2e}, grad rel "
              f"{s['grad_rel']:.2e}, centre rel {s['centre_rel']:.2e}")
    medians = {side: {k: statistics.median(r[side][k] for r in rows) for k in rows[0][side]}
               for side in ("official_fp16_vs_ours", "ours_vs_fp32")}
    print("medians over", len(rows), "batches:", json.dumps(medians, indent=1))
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump({"checkpoint": a.checkpoint, "epoch": epoch, "batch_size": args.batch_size_per_gpu,
                       "out_dim": args.out_dim, "rows": rows, "medians": medians}, f, indent=1)
    return medians


if __name__ == "__main__":
    main()
