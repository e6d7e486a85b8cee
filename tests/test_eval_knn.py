"""k-NN: official fixture, edge cases, and an end-to-end run of evaluation/eval_knn.py on Fashion-MNIST."""
import os

import pytest
import torch

from ibot.eval.knn import knn_classifier
from official_fixtures import FIXTURES

FIX = str(FIXTURES / "knn.pt")


def test_knn_classifier_matches_official():
    d = torch.load(FIX, weights_only=True)
    for k, ref in d["results"].items():
        top1, top5 = knn_classifier(d["train_features"], d["train_labels"], d["test_features"],
                                    d["test_labels"], int(k), d["T"], use_cuda=False,
                                    num_classes=d["num_classes"])
        assert abs(top1 - ref["top1"]) < 1e-4 and abs(top5 - ref["top5"]) < 1e-4, (k, top1, top5, ref)
        # the official chunking (M // 100 rows) gives the same numbers
        assert knn_classifier(d["train_features"], d["train_labels"], d["test_features"], d["test_labels"],
                              int(k), d["T"], use_cuda=False, num_classes=d["num_classes"],
                              chunk_size=len(d["test_labels"]) // 100) == (top1, top5)


def test_knn_small_sets_and_cap():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    labels = torch.arange(30) % 3
    test = train[:7] + 0.01  # fewer than 100 test rows: the official chunking divided by zero
    test = torch.nn.functional.normalize(test, dim=1)
    top1, top5 = knn_classifier(train, labels, test, labels[:7], k=1, T=0.07, use_cuda=False, num_classes=3)
    assert top1 == 100.0 and top5 == 100.0
    # k larger than the train set is capped (same as k = N)
    a = knn_classifier(train, labels, test, labels[:7], k=500, T=0.07, use_cuda=False, num_classes=3)
    b = knn_classifier(train, labels, test, labels[:7], k=30, T=0.07, use_cuda=False, num_classes=3)
    assert a == b
    # chunking does not change the result
    c = knn_classifier(train, labels, test, labels[:7], k=5, T=0.07, use_cuda=False, num_classes=3, chunk_size=2)
    d = knn_classifier(train, labels, test, labels[:7], k=5, T=0.07, use_cuda=False, num_classes=3, chunk_size=7)
    assert c == d


@pytest.fixture(scope="module")
def fmnist_tiny(fmnist_folder):
    return str(fmnist_folder(20, 10))


def _args(data_path, *extra):
    from evaluation.eval_knn import get_args_parser
    return get_args_parser().parse_args([
        "--data_path", data_path, "--arch", "vit_tiny", "--patch_size", "8", "--resize_size", "32",
        "--crop_size", "32", "--use_cuda", "false", "--num_workers", "0", "--batch_size_per_gpu", "64",
        "--pretrained_weights", "", *extra])


@pytest.mark.slow
def test_eval_knn_main_end_to_end(fmnist_tiny, capsys, tmp_path):
    from evaluation.eval_knn import main
    from ibot.eval.features import build_backbone, eval_transform, extract_features, image_folder, make_loader

    results = main(_args(fmnist_tiny, "--dump_features", str(tmp_path / "dump")))["teacher"]
    out = capsys.readouterr().out
    assert set(results) == {10, 20, 100, 200}
    for k, r in results.items():
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
        assert f"{k}-NN classifier result: Top1: {r['top1']}, Top5: {r['top5']}" in out
    assert results[20]["top1"] > 30.0  # 10 classes: chance is 10%; random ViT features are far better
    assert results[200]["top1"] == results[200]["top1"]  # k=200 capped at the 200 train images

    # the returned value is the k-NN accuracy of the random-init backbone (same seed)
    torch.manual_seed(0)
    from ibot.utils.misc import fix_random_seeds
    fix_random_seeds(0)
    model = build_backbone("vit_tiny", 8, img_size=32)
    tf = eval_transform(32, 32)
    tr = make_loader(image_folder(os.path.join(fmnist_tiny, "train"), tf), 64, distributed=False)
    va = make_loader(image_folder(os.path.join(fmnist_tiny, "val"), tf), 64, distributed=False)
    ftr, ltr = extract_features(model, tr)
    fva, lva = extract_features(model, va)
    top1, top5 = knn_classifier(ftr, ltr, fva, lva, 20, 0.07, use_cuda=False, num_classes=10)
    assert abs(top1 - results[20]["top1"]) < 1e-6 and abs(top5 - results[20]["top5"]) < 1e-6
    assert ftr.shape == (200, 192) and torch.allclose(ftr.norm(dim=1), torch.ones(200))

    # dumped features reload and give the same numbers, without touching the data
    again = main(_args("/nonexistent", "--load_features", str(tmp_path / "dump")))["teacher"]
    assert again == results


def test_eval_knn_errors(tmp_path):
    from evaluation.eval_knn import main
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(_args(str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        main(_args(str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="trainfeat.pth"):
        main(_args(str(tmp_path), "--load_features", str(tmp_path)))


def test_swin_frozen_features_and_loading(tmp_path):
    """Swin: §1.4 features on get_intermediate_layers (token 0 = pooled) and checkpoint loading."""
    from ibot.eval.features import feature_dim, frozen_features
    from ibot.eval.weights import load_pretrained_weights
    from ibot.models.swin_transformer import SwinTransformer
    d = torch.load(str(FIXTURES / "swin_small_config.pt"), weights_only=True)
    cfg = {k: v for k, v in d["config"].items() if k not in ("return_all_tokens", "masked_im_modeling")}
    model = SwinTransformer(num_classes=0, **cfg).eval()
    torch.save({"teacher": {"backbone." + k: v for k, v in d["state_dict"].items()}}, tmp_path / "c.pth")
    report = load_pretrained_weights(model, str(tmp_path / "c.pth"), "teacher")
    assert "masked_embed" in report["dropped"] and not report["missing"]
    x = d["x"]
    with torch.no_grad():
        f0 = frozen_features(model, x, n_last_blocks=2, avgpool_patchtokens=0)
        f1 = frozen_features(model, x, n_last_blocks=2, avgpool_patchtokens=1)
        f2 = frozen_features(model, x, n_last_blocks=2, avgpool_patchtokens=2)
        inter = model.get_intermediate_layers(x, 2)
    assert f0.shape == (2, 96) and f1.shape == (2, 48) and f2.shape == (2, 144)
    torch.testing.assert_close(f0[:, 48:], inter[-1][:, 0])
    torch.testing.assert_close(f1, inter[-1][:, 1:].mean(1))
    assert feature_dim(model, 2, 0, img_size=64) == 96
