"""Issue #9: periodic k-NN during pre-training, the small-image recipe learns, the Fashion-MNIST demo."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "0", "--out_dim", "64", "--shared_head", "true", "--head_hidden_dim", "64",
        "--head_bottleneck_dim", "32", "--batch_size_per_gpu", "100", "--warmup_epochs", "0",
        "--warmup_teacher_temp_epochs", "0", "--num_workers", "0", "--seed", "0"]


def _train(argv):
    from main_ibot import get_args_parser
    from ibot.pretrain import train_ibot
    import argparse
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv)
    return train_ibot(args)


def _log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def test_eval_every_matches_eval_knn(fmnist_small, tmp_path):
    """The k-NN logged by --eval_every equals eval_knn.py on the saved checkpoint (teacher and student)."""
    fmnist_small = str(fmnist_small)
    from evaluation.eval_knn import knn_for_checkpoint
    out = str(tmp_path / "run")
    _train(TINY + ["--epochs", "1", "--lr", "0.004", "--data_path", os.path.join(fmnist_small, "train"),
                   "--output_dir", out, "--eval_every", "1", "--eval_data_path", fmnist_small,
                   "--eval_resize_size", "32", "--eval_crop_size", "32", "--eval_nb_knn", "20", "5",
                   "--eval_num_workers", "0"])
    rec = _log(out)[-1]
    for key in ("teacher", "student"):
        ref = knn_for_checkpoint(os.path.join(out, "checkpoint.pth"), fmnist_small, arch="vit_tiny", patch_size=8,
                                 checkpoint_key=key, nb_knn=(20, 5), resize_size=32, crop_size=32, use_cuda=False)
        assert rec[f"knn_top1_{key}"] == pytest.approx(ref[20]["top1"], abs=1e-6)
        assert rec[f"knn_top5_{key}"] == pytest.approx(ref[20]["top5"], abs=1e-6)
        assert rec[f"knn5_top1_{key}"] == pytest.approx(ref[5]["top1"], abs=1e-6)
    # TensorBoard got the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tf_logs"))
    acc.Reload()
    assert acc.Scalars("knn_top1_teacher")[-1].value == pytest.approx(rec["knn_top1_teacher"], abs=1e-4)


def test_eval_every_schedule_and_flags(fmnist_small, tmp_path):
    """--eval_every N runs after every N-th and after the last epoch, never when 0 (default: nothing is
    built); --eval_every without a labelled folder is refused before training."""
    import argparse
    from main_ibot import get_args_parser
    from ibot.cli import check_args
    from ibot.periodic_eval import should_evaluate
    parse = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args
    base = TINY + ["--data_path", os.path.join(str(fmnist_small), "train"), "--output_dir", str(tmp_path)]
    args = parse(base + ["--epochs", "5"])
    assert args.eval_every == 0 and not any(should_evaluate(e, args) for e in range(5))
    args = parse(base + ["--epochs", "5", "--eval_every", "2", "--eval_data_path", str(fmnist_small)])
    assert [e for e in range(5) if should_evaluate(e, args)] == [1, 3, 4]
    assert check_args(args) == []
    errors = check_args(parse(base + ["--epochs", "5", "--eval_every", "1"]))
    assert any("--eval_data_path" in e for e in errors)
    errors = check_args(parse(base + ["--epochs", "5", "--eval_every", "1", "--eval_data_path",
                                      os.path.join(str(fmnist_small), "train")]))
    assert any("no train/ folder" in e for e in errors)
