"""Linear probes (single lr and the lr sweep), logistic regression and unsupervised classification."""
import json
import os

import pytest
import torch
from official_fixtures import FIXTURES

FIX = str(FIXTURES)
OFFICIAL = os.path.join(FIX, "official_checkpoint.pth")


@pytest.fixture(scope="module")
def fmnist_mini(fmnist_folder):
    return str(fmnist_folder(5, 3))


def _common(data, out, *extra):
    return ["--data_path", data, "--arch", "vit_tiny", "--patch_size", "8", "--resize_size", "32",
            "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "25", "--output_dir", str(out),
            *extra]


def test_lr_grid_and_heads():
    from evaluation.eval_linear_multi import head_specs, lr_grid
    grid = lr_grid()
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(9)
    assert grid == sorted(grid)
    assert len(head_specs(True)) == 45
    specs = head_specs(False)
    assert len(specs) == 180
    assert [(s.wd, s.optim) for s in specs[:4]] == [(0, "sgd"), (0, "lars"), (1e-6, "sgd"), (1e-6, "lars")]
    assert specs[4].lr == grid[1]


def test_sweep_lr_only_is_a_real_bool():
    from evaluation.eval_linear_multi import get_args_parser
    assert get_args_parser().parse_args(["--sweep_lr_only", "False"]).sweep_lr_only is False
    assert get_args_parser().parse_args([]).sweep_lr_only is True


def test_lars_excludes_biases():
    from evaluation.eval_linear import LARS
    w = torch.nn.Parameter(torch.ones(2, 2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=1.0, weight_decay=0.0, momentum=0.0, eta=0.001)
    w.grad = torch.full((2, 2), 3.0)
    b.grad = torch.full((2,), 3.0)
    opt.step()
    # weight: update scaled by eta*|w|/|g| = 0.001*2/6 -> step 0.001 per entry; bias: plain SGD
    torch.testing.assert_close(w.data, torch.full((2, 2), 1 - 0.001))
    torch.testing.assert_close(b.data, torch.full((2,), -2.0))


@pytest.mark.slow
def test_linear_multi_and_single_end_to_end(fmnist_mini, tmp_path):
    from evaluation import eval_linear, eval_linear_multi
    from ibot.utils.checkpoint import safe_load

    args = eval_linear_multi.get_args_parser().parse_args(
        _common(fmnist_mini, tmp_path / "multi", "--epochs", "2", "--n_last_blocks", "2", "--avgpool_patchtokens", "2"))
    res = eval_linear_multi.main(args)["teacher"]
    assert res["feature_dim"] == 3 * 192 and res["num_labels"] == 10
    assert 0 <= res["best_acc"] <= 100 and res["best_config"]["optimizer"] == "sgd"
    best = json.load(open(tmp_path / "multi" / "best_teacher.json"))
    assert best["best_acc"] == res["best_acc"] and best["best_config"]["lr"] == res["best_config"]["lr"]
    ckpt = safe_load(tmp_path / "multi" / "checkpoint_teacher_linear.pth")
    assert {"epoch", "state_dict", "optimizers", "schedulers", "best_acc", "best_acc_hidx",
            "best_acc_sweep_lr_only"} <= set(ckpt)
    assert "44.module.linear.weight" in ckpt["state_dict"] and len(ckpt["optimizers"]) == 45
    # resume from the saved file (optimizers/schedulers restored) and finish a third epoch
    args3 = eval_linear_multi.get_args_parser().parse_args(
        _common(fmnist_mini, tmp_path / "multi", "--epochs", "3", "--n_last_blocks", "2", "--avgpool_patchtokens", "2",
                "--load_from", "checkpoint_teacher_linear.pth"))
    res3 = eval_linear_multi.main(args3)["teacher"]
    assert res3["best_acc"] >= res["best_acc"]

    args = eval_linear.get_args_parser().parse_args(
        _common(fmnist_mini, tmp_path / "single", "--epochs", "1", "--lr", "0.5", "--avgpool_patchtokens", "1"))
    res = eval_linear.main(args)["teacher"]
    assert res["feature_dim"] == 192
    ckpt = safe_load(tmp_path / "single" / "checkpoint_teacher_linear.pth")
    assert set(ckpt["state_dict"]) == {"module.linear.weight", "module.linear.bias"}
    assert {"optimizer", "scheduler", "best_acc", "epoch"} <= set(ckpt)
    line = json.loads(open(tmp_path / "single" / "log.txt").read().splitlines()[-1])
    assert "train_loss" in line and "test_acc1" in line and line["epoch"] == 0


def test_linear_missing_data_folder(tmp_path):
    from evaluation import eval_linear
    args = eval_linear.get_args_parser().parse_args(_common(str(tmp_path / "absent"), tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="absent"):
        eval_linear.main(args)


def test_logistic_regression_on_fixture_features(tmp_path):
    from evaluation import eval_logistic_regression as lr
    d = torch.load(os.path.join(FIX, "knn.pt"), weights_only=True)
    acc = lr.fit_logistic_regression(d["train_features"], d["train_labels"], d["test_features"], d["test_labels"], 1e-3)
    assert 0.9 <= acc <= 1.0  # k-NN gets 99% on these features
    # main on dumped features (the k-NN dump format)
    for name, t in zip(("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth"),
                       (d["train_features"], d["test_features"], d["train_labels"], d["test_labels"])):
        torch.save(t, tmp_path / name)
    args = lr.get_args_parser().parse_args(["--load_features", str(tmp_path), "--lr_lambd", "0.001", "1"])
    out = lr.main(args)["teacher"]
    assert out[0.001] == pytest.approx(acc) and 0.0 <= out[1.0] <= out[0.001]


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_unsup_cls_loads_both_prefixes(fmnist_mini, monkeypatch, key):
    from evaluation.unsupervised import unsup_cls
    from ibot.models.vision_transformer import VisionTransformer
    assert unsup_cls.eval_pred is __import__("ibot.eval.cluster_metrics", fromlist=["eval_pred"]).eval_pred

    def tiny(*a, **k):
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True).eval()

    monkeypatch.setattr(unsup_cls, "build_backbone", tiny)
    args = unsup_cls.get_args_parser().parse_args([
        "--data_path", fmnist_mini, "--pretrained_weights", OFFICIAL, "--checkpoint_key", key,
        "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--resize_size", "32",
        "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"])
    res = unsup_cls.main(args)
    assert set(res) == {"nmi", "ari", "fscore", "acc"}
    assert 0 <= res["nmi"] <= 1 and 0 < res["acc"] <= 1
    # wrong head size: error naming the mismatch
    args.out_dim = 65
    with pytest.raises(Exception, match="last_layer"):
        unsup_cls.main(args)
