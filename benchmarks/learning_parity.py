"""Training dynamics of the same recipe in both codebases, over several seeds (issue 19).

For every seed, pre-trains the calibration recipe (``../shared/reference/calibration.md``: vit_tiny/8,
32/16 px, 2+2 crops, 512 shared prototypes, lr 0.002, teacher momentum 0.99, warm-ups 2, fp32)
once with this repository (``main_ibot.py``) and once with the official code (through
``../shared/tools/official/run_official.py pretrain``), on the same Fashion-MNIST folder. Then the
official k-NN (``run_official.py knn``: official loader, ``extract_features`` and ``knn_classifier``)
scores the final teacher and student of both sides' checkpoints. Writes, into ``--out_dir``:

* ``learning_parity.json`` — the recipe, the exact commands, per side and epoch the mean, sample
  standard deviation, min and max over seeds of ``loss``, ``cls``, ``patch``, ``acc``, ``nmi`` (the
  ``train_*`` entries of ``log.txt``), the same for the final k-NN top-1 (k = 20) of teacher and
  student, and every seed's raw figures;
* ``learning_parity_table.md`` — the same as a Markdown table;
* ``learning_parity.png`` — the curves of both sides side by side (mean line, min–max band).

Runs are resumable: a seed whose ``log.txt`` already holds ``--epochs`` epochs (and whose k-NN JSON
exists) is not run again, and ``--reuse_record FILE`` takes the seeds of an earlier record made with
the same budget (to add seeds to a committed table on another machine). The official side needs ``$IBOT_REF`` (a checkout of bytedance/ibot) and
``tensorboardX``/``munkres`` importable (``--official_pythonpath``); see the harness README. This
is a benchmark: CI never runs it (``tests/test_learning_parity.py`` replays this repository's side
against the committed official figures).

    python benchmarks/learning_parity.py --epochs 2 --seeds 0 1 --per_class_train 32 \\
        --out_dir benchmarks/data/learning_parity --work_dir runs/parity
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.normpath(os.path.join(REPO, "..", "shared", "tools", "official", "run_official.py"))

#: the calibration recipe, as flags both ``main_ibot.py`` and the official parser take
RECIPE = ["--arch", "vit_tiny", "--patch_size", "8", "--out_dim", "512", "--patch_out_dim", "512",
          "--shared_head", "true", "--norm_last_layer", "false", "--teacher_temp", "0.07",
          "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2", "--batch_size_per_gpu", "64",
          "--lr", "0.002", "--momentum_teacher", "0.99", "--warmup_epochs", "2",
          "--warmup_teacher_temp_epochs", "2", "--local_crops_number", "2", "--local_crops_scale", "0.2", "0.5",
          "--global_crops_scale", "0.5", "1", "--use_fp16", "false"]
OURS_SIZES = ["--global_crops_size", "32", "--local_crops_size", "16"]
OFFICIAL_SIZES = ["--global_size", "32", "--local_size", "16", "--model_img_size", "32"]
METRICS = ("loss", "cls", "patch", "acc", "nmi")
SIDES = ("official", "ours")
KNN_K = "20"


def get_args_parser():
    """Budget (epochs, seeds, data size), locations and the official checkout."""
    p = argparse.ArgumentParser("Learning parity: this repository vs the official iBOT code")
    p.add_argument("--epochs", type=int, default=10, help="pre-training epochs per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (one run per side each)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--per_class_train", type=int, default=300, help="Fashion-MNIST train images per class")
    p.add_argument("--per_class_val", type=int, default=100, help="val images per class (k-NN; >= 10)")
    p.add_argument("--data", default=None, help="Fashion-MNIST 32-px folder (default: under --work_dir)")
    p.add_argument("--work_dir", default="runs/learning_parity", help="run folders (checkpoints, logs)")
    p.add_argument("--out_dir", default="benchmarks/data/learning_parity", help="JSON, Markdown and PNG")
    p.add_argument("--num_workers", type=int, default=2, help="loader workers (both sides)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS too)")
    p.add_argument("--official_ref", default=os.environ.get("IBOT_REF", ""),
                   help="checkout of bytedance/ibot (default $IBOT_REF)")
    p.add_argument("--official_pythonpath", default="",
                   help="extra import path for the official side (tensorboardX, munkres)")
    p.add_argument("--harness", default=HARNESS, help="run_official.py")
    p.add_argument("--ours_flags", default="",
                   help="extra main_ibot.py flags of our side, one string (e.g. \"--sample_seeding false\"); "
                        "use another --work_dir and --out_dir for such runs; --reuse_record then reuses "
                        "the official side only")
    p.add_argument("--no_knn", action="store_true", help="skip the final k-NN")
    p.add_argument("--reuse_record", default="",
                   help="a learning_parity.json of an earlier run: its (side, seed) figures are taken as "
                        "done when its recipe, epochs and data size equal this run's (adds seeds to a "
                        "committed table without its run folders)")
    return p


def check_args(args):
    """Clear errors before any run starts."""
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds has duplicates: {args.seeds}")
    if args.per_class_val < 10:
        raise SystemExit("--per_class_val must be >= 10 (the official k-NN needs >= 100 val images)")
    if args.per_class_train * 10 < 64:
        raise SystemExit(f"--per_class_train {args.per_class_train}: fewer than one batch of 64 images")
    if "official" in args.sides:
        if not os.path.isfile(args.harness):
            raise SystemExit(f"--harness {args.harness}: no such file")
        if not os.path.isfile(os.path.join(args.official_ref or "", "main_ibot.py")):
            raise SystemExit(f"--official_ref / $IBOT_REF {args.official_ref!r} is not a checkout of "
                             "bytedance/ibot (see ../shared/tools/official/README.md)")


def _env(args, official):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if official:
        env["IBOT_REF"] = os.path.abspath(args.official_ref)
        env["PYTHONPATH"] = args.official_pythonpath  # the repository must be off the path (harness README)
    return env


def pretrain_command(side, seed, args, out):
    """argv of one pre-training run of ``side`` (``"ours"`` / ``"official"``)."""
    common = RECIPE + ["--epochs", str(args.epochs), "--seed", str(seed), "--num_workers", str(args.num_workers),
                       "--data_path", os.path.join(args.data, "train"), "--output_dir", out]
    if side == "ours":
        return [sys.executable, os.path.join(REPO, "main_ibot.py")] + common + OURS_SIZES + args.ours_flags.split()
    return [sys.executable, args.harness, "pretrain"] + common + OFFICIAL_SIZES + ["--threads", str(args.threads)]


def knn_command(ckpt, key, args, out_json):
    """argv of the official k-NN on ``ckpt[key]`` (either side's checkpoint)."""
    return [sys.executable, args.harness, "knn", "--pretrained_weights", ckpt, "--checkpoint_key", key,
            "--data_path", args.data, "--crop_size", "32", "--resize_size", "32", "--model_img_size", "32",
            "--num_workers", str(args.num_workers), "--threads", str(args.threads), "--out_json", out_json]


def read_log(out):
    """Per-epoch ``train_*`` figures of a run's ``log.txt`` as ``[{metric: value}]`` (epoch order)."""
    path = os.path.join(out, "log.txt")
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if "train_loss" in r]
    rows.sort(key=lambda r: r["epoch"])
    return [{m: r[f"train_{m}"] for m in METRICS} for r in rows]


def _run(cmd, env, log_path):
    with open(log_path, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        res = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        raise SystemExit(f"command failed (exit {res.returncode}); see {log_path}:\n  {shlex.join(cmd)}")


def reusable_figures(args):
    """``{side: {seed: figures}}`` of ``--reuse_record`` when it was made with this run's budget, else {}."""
    if not args.reuse_record:
        return {}
    if not os.path.isfile(args.reuse_record):
        raise SystemExit(f"--reuse_record {args.reuse_record}: no such file")
    rec = json.load(open(args.reuse_record))
    mine = {"recipe": RECIPE, "epochs": args.epochs, "per_class_train": args.per_class_train,
            "per_class_val": args.per_class_val}
    differ = [k for k, v in mine.items() if rec.get(k) != v]
    if differ:
        raise SystemExit(f"--reuse_record {args.reuse_record}: made with another {', '.join(differ)}")
    # our side's runs of the record were made without --ours_flags, so with such flags only the official
    # side is reused
    return {side: {int(seed): fig for seed, fig in seeds.items() if len(fig["epochs"]) >= args.epochs}
            for side, seeds in rec["raw"].items() if not (side == "ours" and args.ours_flags)}


def run_all(args):
    """Run every missing (side, seed) pre-training and k-NN; returns the raw figures and the commands."""
    jobs = [(side, seed) for seed in args.seeds for side in args.sides]
    raw, commands, done_s, t_start = {}, [], [], time.time()
    reused = reusable_figures(args)
    for i, (side, seed) in enumerate(jobs):
        if seed in reused.get(side, {}):
            raw.setdefault(side, {})[str(seed)] = reused[side][seed]
            print(f"[{i + 1}/{len(jobs)}] {side} seed {seed}: taken from {args.reuse_record}", flush=True)
            continue
        out = os.path.abspath(os.path.join(args.work_dir, f"{side}_s{seed}"))
        os.makedirs(out, exist_ok=True)
        cmd = pretrain_command(side, seed, args, out)
        commands.append(shlex.join(cmd))
        t0, ran = time.time(), False
        if len(read_log(out)) < args.epochs:
            ran = True
            if os.path.isfile(os.path.join(out, "log.txt")):
                os.remove(os.path.join(out, "log.txt"))  # an interrupted run starts over
            for name in ("checkpoint.pth",):
                if os.path.isfile(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
            _run(cmd, _env(args, official=side == "official"), os.path.join(out, "stdout.txt"))
        epochs = read_log(out)[:args.epochs]
        knn = {}
        if not args.no_knn:
            for key in ("teacher", "student"):
                out_json = os.path.join(out, f"knn_{key}.json")
                kcmd = knn_command(os.path.join(out, "checkpoint.pth"), key, args, out_json)
                commands.append(shlex.join(kcmd))
                if not os.path.isfile(out_json):
                    ran = True
                    _run(kcmd, _env(args, official=True), os.path.join(out, "stdout.txt"))
                knn[key] = json.load(open(out_json))["top1"][KNN_K]
        raw.setdefault(side, {})[str(seed)] = {"epochs": epochs, "knn_top1": knn}
        if ran:  # runs found complete are not timed (the ETA would be too optimistic)
            done_s.append(time.time() - t0)
        left = len(jobs) - i - 1
        eta = statistics.mean(done_s) * left if done_s else float("nan")
        print(f"[{i + 1}/{len(jobs)}] {side} seed {seed}: {len(epochs)} epochs, k-NN {knn} "
              f"({time.time() - t0:.0f} s; elapsed {time.time() - t_start:.0f} s, ETA {eta:.0f} s)", flush=True)
    return raw, commands


def _stats(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(raw, epochs):
    """Per side: per epoch and metric, and for the final k-NN, mean / std / min / max over seeds."""
    summary = {}
    for side, seeds in raw.items():
        per_epoch = []
        for e in range(epochs):
            runs = [s["epochs"][e] for s in seeds.values() if len(s["epochs"]) > e]
            per_epoch.append({m: _stats([r[m] for r in runs]) for m in METRICS} if runs else {})
        knn = {}
        for key in ("teacher", "student"):
            vals = [s["knn_top1"][key] for s in seeds.values() if key in s["knn_top1"]]
            if vals:
                knn[key] = _stats(vals)
        summary[side] = {"per_epoch": per_epoch, "knn_top1": knn}
    return summary


def _fmt(st, digits=3):
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}" if st else "–"


def markdown_table(summary, seeds):
    """One Markdown table: rows epoch x side, columns mean ± std of each metric; then the final k-NN."""
    lines = [f"Mean ± sample standard deviation over seeds {seeds}.", "",
             "| epoch | side | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    n_epochs = max(len(s["per_epoch"]) for s in summary.values())
    for e in range(n_epochs):
        for side in SIDES:
            if side in summary and e < len(summary[side]["per_epoch"]):
                row = summary[side]["per_epoch"][e]
                lines.append(f"| {e + 1} | {side} | " + " | ".join(_fmt(row.get(m)) for m in METRICS) + " |")
    lines += ["", f"| final k-NN top-1 (k={KNN_K}, official k-NN) | teacher | student |", "|---|---|---|"]
    for side in SIDES:
        if side in summary and summary[side]["knn_top1"]:
            knn = summary[side]["knn_top1"]
            lines.append(f"| {side} | {_fmt(knn.get('teacher'), 2)} | {_fmt(knn.get('student'), 2)} |")
    return "\n".join(lines) + "\n"


def plot(summary, path, title):
    """Curves of both sides side by side: one panel per metric (mean line, min-max band) + final k-NN."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, (len(METRICS) + 2) // 2, figsize=(13, 7.5))
    axes = axes.ravel()
    colors = {"official": "tab:blue", "ours": "tab:orange"}
    for ax, metric in zip(axes, METRICS):
        for side, s in summary.items():
            rows = [(e + 1, r[metric]) for e, r in enumerate(s["per_epoch"]) if r]
            if not rows:
                continue
            x = [e for e, _ in rows]
            ax.plot(x, [r["mean"] for _, r in rows], "o-", color=colors[side], label=side)
            ax.fill_between(x, [r["min"] for _, r in rows], [r["max"] for _, r in rows],
                            color=colors[side], alpha=0.25)
        ax.set_title(f"train_{metric}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend()
    ax = axes[-1]
    for j, (side, s) in enumerate(summary.items()):
        for i, key in enumerate(("teacher", "student")):
            st = s["knn_top1"].get(key)
            if st:
                ax.bar(i + 0.38 * j, st["mean"], 0.36, yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]],
                       color=colors[side], label=side if i == 0 else None, capsize=3)
    ax.set_xticks([0.19, 1.19], ["teacher", "student"])
    ax.set_title(f"final k-NN top-1 (k={KNN_K}, %)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    """Run (or resume) every run, then write the JSON, Markdown table and PNG; returns the summary."""
    args = get_args_parser().parse_args(argv)
    args.data = args.data or os.path.join(args.work_dir, f"fmnist32_{args.per_class_train}_{args.per_class_val}")
    check_args(args)
    from ibot.data.fmnist import build_fmnist_folder
    build_fmnist_folder(args.data, size=32, per_class_train=args.per_class_train, per_class_val=args.per_class_val)
    raw, commands = run_all(args)
    if args.reuse_record:  # the commands of the reused runs, as that record wrote them
        old = json.load(open(args.reuse_record))["commands"]
        commands = old + [c for c in commands if c not in old]
    summary = summarize(raw, args.epochs)
    os.makedirs(args.out_dir, exist_ok=True)
    budget = (f"{args.epochs} epochs x seeds {args.seeds}, Fashion-MNIST {args.per_class_train * 10}/"
              f"{args.per_class_val * 10} images, {args.threads} thread(s), {args.num_workers} workers")
    record = {"budget": budget, "epochs": args.epochs, "seeds": args.seeds,
              "per_class_train": args.per_class_train, "per_class_val": args.per_class_val,
              "num_workers": args.num_workers, "threads": args.threads,
              "recipe": RECIPE, "invocation": shlex.join([sys.executable, *sys.argv]) if argv is None else argv,
              "commands": commands, "summary": summary, "raw": raw}
    with open(os.path.join(args.out_dir, "learning_parity.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out_dir, "learning_parity_table.md"), "w") as f:
        f.write(f"Budget: {budget}.\n\n" + markdown_table(summary, args.seeds))
    plot(summary, os.path.join(args.out_dir, "learning_parity.png"), f"iBOT calibration recipe: {budget}")
    print(markdown_table(summary, args.seeds))
    print(f"wrote {args.out_dir}/learning_parity.json, learning_parity_table.md, learning_parity.png")
    return summary


if __name__ == "__main__":
    main()
