"""Fashion-MNIST learning-curve demo (``./run.sh fmnist_demo JOB vit_tiny teacher 0``).

Three steps, each a sub-command of ``python -m ibot.demo`` (``run.sh`` launches the pre-training in
between with its ``launch`` function, so the same demo runs on the CPU or under torchrun on GPUs):

``prepare --data D --output_dir O``
    builds the 32-px Fashion-MNIST folder ``D`` if it is missing (300 train / 100 val images per
    class, :func:`ibot.fmnist.build_fmnist_folder`) and records the start time in ``O``.
``flags --data D``
    prints the pre-training flags: the small-image recipe (:data:`SMALL_IMAGE_RECIPE`, figures in
    ``docs/small_image_recipe.md``) plus ``--data_path D/train`` and ``--eval_every 1`` on ``D``.
``report --data D --output_dir O``
    measures the k-NN of the random initialisation (same protocol, same architecture, seed of the run),
    and writes ``O/learning_curve.png`` (k-NN top-1 of teacher and student by epoch beside the random
    level; training loss by epoch) and ``O/summary.json``.

``summary.json`` keys: ``knn_top1_teacher``, ``knn_top1_student`` (last epoch), ``knn_top1_random``,
``k``, ``epochs`` (finished), ``minutes`` (wall time from ``prepare`` to the end of ``report``),
``pretrain_minutes`` (from the data being ready to the last checkpoint), ``arch``, ``patch_size``,
``curve`` (per-epoch k-NN and loss) and ``recipe`` (the flags of the run, from the checkpoint).
"""
import argparse
import json
import os
import sys
import time

from ibot.train.config import recipe_argv

__all__ = ["SMALL_IMAGE_RECIPE", "demo_flags", "prepare", "report", "read_log", "main"]

#: The small-image recipe: explicit options on top of the official defaults (which stay unchanged),
#: as main_ibot.py flags read from ibot/configs/small_image_fmnist.yaml (configs/ at the repository root).
#: Per-choice figures: docs/small_image_recipe.md.
SMALL_IMAGE_RECIPE = recipe_argv("small_image_fmnist")
#: Loss terms logged per epoch (log.txt keys) and their labels in the plot.
LOSS_TERMS = (("train_loss", "total"), ("train_cls", "[CLS] distillation"), ("train_patch", "masked patches"),
              ("train_koleo", "KoLeo (unweighted)"))
EVAL_SIZE = 32
PER_CLASS_TRAIN, PER_CLASS_VAL = 300, 100
_START_FILE = "demo_start.json"


def demo_flags(data_dir):
    """Pre-training flags of the demo: the recipe, the data and the per-epoch k-NN on ``data_dir``."""
    return SMALL_IMAGE_RECIPE + [
        "--data_path", os.path.join(data_dir, "train"),
        "--eval_every", "1", "--eval_data_path", data_dir,
        "--eval_resize_size", str(EVAL_SIZE), "--eval_crop_size", str(EVAL_SIZE), "--eval_nb_knn", "20",
    ]


def prepare(data_dir, output_dir, per_class_train=PER_CLASS_TRAIN, per_class_val=PER_CLASS_VAL):
    """Build the Fashion-MNIST folder unless ``data_dir`` already has train/ and val/ (then it is used as
    it is); record the start time. Returns the builder's report (``{'built': False}`` when skipped)."""
    start = time.time()
    from ibot.data.fmnist import build_fmnist_folder
    os.makedirs(output_dir, exist_ok=True)
    if all(os.path.isdir(os.path.join(data_dir, split)) for split in ("train", "val")):
        res = {"built": False}  # an existing labelled folder is used as it is
        print(f"{data_dir}: using the existing train/ and val/ folders")
    else:
        res = build_fmnist_folder(data_dir, size=EVAL_SIZE, per_class_train=per_class_train,
                                  per_class_val=per_class_val)
        print(f"{data_dir}: built {res['train']} train / {res['val']} val images, {res['size']} px")
    with open(os.path.join(output_dir, _START_FILE), "w") as f:
        json.dump({"start": start, "data_ready": time.time()}, f)
    return res


def read_log(output_dir):
    """The epoch records of ``output_dir/log.txt`` (list of dicts, in order)."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: did the pre-training run?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curve(records, random_level, path, title=""):
    """k-NN top-1 (teacher, student) by epoch beside ``random_level``, and the loss terms, into ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] + 1 for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("teacher", "o-"), ("student", "s--")):
        pts = [(e, r[f"knn_top1_{key}"]) for e, r in zip(epochs, records) if f"knn_top1_{key}" in r]
        if pts:
            ax1.plot(*zip(*pts), style, label=f"{key}")
    ax1.axhline(random_level, color="gray", linestyle=":", label=f"random init ({random_level:.1f})")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("k-NN top-1 (%)")
    ax1.set_title("k-NN (k=20) on Fashion-MNIST val")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for (key, label), style in zip(LOSS_TERMS, ("o-", "s--", "^--", "d:")):
        if any(key in r for r in records):
            ax2.plot(epochs, [r.get(key, float("nan")) for r in records], style, label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss (epoch mean)")
    ax2.set_title("training loss terms")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(data_dir, output_dir, k=20):
    """Random-init k-NN, ``learning_curve.png`` and ``summary.json`` in ``output_dir``; returns the summary."""
    import torch

    from ibot.eval.knn import knn_for_checkpoint
    from ibot.utils.checkpoint import safe_load

    records = read_log(output_dir)
    ckpt = safe_load(os.path.join(output_dir, "checkpoint.pth"))
    run_args = vars(ckpt["args"])
    arch, patch = run_args["arch"], run_args["patch_size"]
    size = run_args.get("eval_crop_size", EVAL_SIZE)
    resize = run_args.get("eval_resize_size", EVAL_SIZE)
    pretrain_end = os.path.getmtime(os.path.join(output_dir, "checkpoint.pth"))
    random_level = knn_for_checkpoint("", data_dir, arch=arch, patch_size=patch, nb_knn=(k,), resize_size=resize,
                                      crop_size=size, seed=run_args.get("seed", 0), num_workers=2,
                                      use_cuda=torch.cuda.is_available())[k]["top1"]
    last = records[-1]
    start_info = {}
    start_path = os.path.join(output_dir, _START_FILE)
    if os.path.isfile(start_path):
        with open(start_path) as f:
            start_info = json.load(f)
    now = time.time()
    summary = {
        "knn_top1_teacher": last.get("knn_top1_teacher"),
        "knn_top1_student": last.get("knn_top1_student"),
        "knn_top1_random": random_level,
        "k": k,
        "epochs": int(ckpt["epoch"]),
        "minutes": round((now - start_info["start"]) / 60, 2) if start_info else None,
        "pretrain_minutes": round((pretrain_end - start_info["data_ready"]) / 60, 2) if start_info else None,
        "arch": arch, "patch_size": patch,
        "curve": [{"epoch": r["epoch"] + 1, **{key: r[key] for key in [k for k, _ in LOSS_TERMS]
                                               + ["knn_top1_teacher", "knn_top1_student"] if key in r}}
                  for r in records],
        "recipe": {key: v for key, v in run_args.items() if key not in ("rank", "world_size", "gpu", "distributed")
                   and isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
    }
    plot_curve(records, random_level, os.path.join(output_dir, "learning_curve.png"),
               title=f"iBOT {arch}/{patch}, small-image recipe, {summary['epochs']} epochs")
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"k-NN top-1 (k={k}): teacher {summary['knn_top1_teacher']}, student {summary['knn_top1_student']}, "
          f"random init {random_level}; {summary['epochs']} epochs, {summary['minutes']} min in all")
    print(f"Wrote {os.path.join(output_dir, 'learning_curve.png')} and {os.path.join(output_dir, 'summary.json')}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser("python -m ibot.demo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "flags", "report"):
        s = sub.add_parser(name)
        s.add_argument("--data", default="data/fmnist32", help="Fashion-MNIST folder (train/, val/)")
        if name != "flags":
            s.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.data, args.output_dir)
        elif args.cmd == "flags":
            print(" ".join(demo_flags(args.data)))
        else:
            report(args.data, args.output_dir)
    except (FileNotFoundError, ValueError) as err:
        p.exit(1, f"{p.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
