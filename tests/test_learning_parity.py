"""This repository's training dynamics against the official code's, recorded by
``benchmarks/learning_parity.py`` (CI cannot run the official code, so its per-epoch figures are data:
``benchmarks/data/learning_parity/learning_parity.json``).

The test trains this repository's side of the same recipe, on the same Fashion-MNIST folder, with the
seeds of the record, and finds the two-seed mean of the per-epoch ``loss``, ``acc`` and ``nmi`` within the range the
official seeds spanned (plus a small margin).
"""
import argparse
import json
import os

import pytest
from repo_files import load_repo_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(REPO, "benchmarks", "data", "learning_parity", "learning_parity.json")

#: metric -> absolute margin added on both sides of the official seed range: loss in nats, acc and
#: NMI as fractions (about a tenth of the official seed spread of each, so the test checks the
#: recorded range, not a wider band).
MARGINS = {"loss": 0.03, "acc": 0.02, "nmi": 0.01}


def _band(stats, margin):
    """The official seed range [min, max] over the recorded seeds, widened by ``margin``."""
    return stats["min"] - margin, stats["max"] + margin


@pytest.mark.slow
def test_first_epochs_within_official_spread(fmnist_folder, tmp_path):
    from main_ibot import get_args_parser
    from ibot.train.driver import train_ibot
    learning_parity = _parity_module()

    record = json.load(open(RECORD))
    official = record["summary"]["official"]["per_epoch"]
    assert len(record["seeds"]) >= 2 and len(official) == record["epochs"]
    data = fmnist_folder(record["per_class_train"], record["per_class_val"])
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    ours = {}
    for seed in record["seeds"][:2]:
        out = tmp_path / f"s{seed}"
        argv = learning_parity.RECIPE + learning_parity.OURS_SIZES + [
            "--epochs", str(record["epochs"]), "--seed", str(seed), "--num_workers", str(record["num_workers"]),
            "--data_path", str(data / "train"), "--output_dir", str(out)]
        train_ibot(parser.parse_args(argv))
        ours[seed] = learning_parity.read_log(str(out))
    for epoch, off in enumerate(official):
        for metric, margin in MARGINS.items():
            mean = sum(run[epoch][metric] for run in ours.values()) / len(ours)
            lo, hi = _band(off[metric], margin)
            assert lo <= mean <= hi, (f"epoch {epoch + 1} {metric}: ours {mean:.4f} (seeds "
                                      f"{[round(r[epoch][metric], 4) for r in ours.values()]}) outside the "
                                      f"official band [{lo:.4f}, {hi:.4f}] ({off[metric]})")


def _parity_module():
    return load_repo_file("benchmarks/learning_parity.py")


def test_reuse_record_takes_complete_seeds_of_the_same_budget_only(tmp_path):
    """``--reuse_record``: seeds of a committed record count as done when recipe, epochs and data size
    match; a record of another budget is refused by name; a seed with fewer epochs is run again."""
    parity = _parity_module()
    record = json.load(open(RECORD))
    args = parity.get_args_parser().parse_args(
        ["--epochs", str(record["epochs"]), "--per_class_train", str(record["per_class_train"]),
         "--per_class_val", str(record["per_class_val"]), "--reuse_record", RECORD])
    reused = parity.reusable_figures(args)
    assert sorted(reused["official"]) == sorted(record["seeds"]) == sorted(reused["ours"])
    assert reused["ours"][record["seeds"][0]] == record["raw"]["ours"][str(record["seeds"][0])]
    args.ours_flags = "--sample_seeding false"       # our runs of the record were made without it
    assert list(parity.reusable_figures(args)) == ["official"]
    args.ours_flags = ""

    short = dict(record, raw={"ours": {"0": {"epochs": record["raw"]["ours"]["0"]["epochs"][:1], "knn_top1": {}}}})
    path = tmp_path / "short.json"
    path.write_text(json.dumps(short))
    args.reuse_record = str(path)
    assert parity.reusable_figures(args) == {"ours": {}}

    args.epochs += 1
    with pytest.raises(SystemExit, match="made with another epochs"):
        parity.reusable_figures(args)
