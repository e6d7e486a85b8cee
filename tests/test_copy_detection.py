"""Copydays copy detection: GeM and the [CLS] ⊕ GeM descriptor, whitening, per-block AP on a hand-made
ranking, and the script end to end (equal to a direct computation) on a tiny Copydays folder."""
import pytest
import torch

from ibot.eval.copy_detection import (BLOCK_NAMES, CopydaysBlocks, block_map, copy_descriptor, gem,
                                      positives_per_query, whiten)


def test_block_order_and_official_sizes():
    assert BLOCK_NAMES[:3] == ["original", "strong", "jpegqual/3"] and BLOCK_NAMES[-1] == "crops/80"
    assert len(BLOCK_NAMES) == 20 and BLOCK_NAMES[10] == "jpegqual/75" and BLOCK_NAMES[11] == "crops/10"


def test_gem_and_descriptor():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [-5.0, 0.0]]])      # (1, 3, 2)
    want = torch.tensor([[((1 + 81 + 1e-24) / 3) ** 0.25, ((16 + 256 + 1e-24) / 3) ** 0.25]])
    torch.testing.assert_close(gem(tokens), want)

    class Fake(torch.nn.Module):
        def get_intermediate_layers(self, x, n=1):
            assert n == 1
            return [torch.cat([torch.full((x.shape[0], 1, 2), 7.0), tokens.expand(x.shape[0], -1, -1)], 1)]

    d = copy_descriptor(Fake(), torch.zeros(2, 3, 8, 8))
    torch.testing.assert_close(d, torch.cat([torch.full((2, 2), 7.0), want.expand(2, -1)], 1))


def test_whitening_is_inverse_second_moment_after_centring():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 4, generator=g, dtype=torch.float64) + 2.0
    db, q = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    wdb, wq = whiten(db, q, w)
    m = w.mean(0)
    cinv = torch.linalg.inv(w.T @ w / w.shape[0])           # UNcentred second moment (official)
    # y = (x - m) V D^-1/2, so y_i . y_j = (x_i - m) C^-1 (x_j - m): sign-free check
    torch.testing.assert_close((wq @ wdb.T).double(), (q - m) @ cinv @ (db - m).T, rtol=1e-4, atol=1e-4)


def test_block_map_hand_made_ranking():
    positives = {"original": [[0], [1]], "strong": positives_per_query("strong", ["2000.jpg", "2001.jpg"],
                                                                       ["2000a.jpg", "2001a.jpg"])}
    positives["strong"][0] = [0, 1]                            # two positives for the first strong query
    far = list(range(2, 24))
    indices = torch.tensor([
        [0, 1] + far[:20],            # original 0: rank 0 -> AP 1
        [0, 1] + far[:20],            # original 1: rank 1 -> (0 + 1/2)/2 = 1/4
        [1, 2, 0] + far[1:20],        # strong 0, positives {0, 1} at ranks 0, 2 -> 19/24
        far[:20] + [1, 0],            # strong 1: positive at rank 20, outside the top 20 -> 0
    ])
    scores = block_map(indices, [("original", 2), ("strong", 2)], positives)
    assert scores["original"] == pytest.approx((1 + 0.25) / 2)
    assert scores["strong"] == pytest.approx((19 / 24 + 0) / 2)
    with pytest.raises(ValueError, match="no original shares"):
        positives_per_query("strong", ["2000.jpg"], ["2100.jpg"])


def test_copy_detection_script_equals_direct_computation(tmp_path, capsys):
    from evaluation.eval_copy_detection import main
    from ibot.data.fmnist_toolbox import build_copydays, fmnist_rgb
    from ibot.eval.copy_detection import ImageList, copydays_transform, rank_top_k
    from ibot.eval.features import build_backbone
    torch.set_num_threads(1)
    data = tmp_path / "copydays"
    names = build_copydays(str(data), n_originals=3, size=32)
    extra = tmp_path / "distractors"
    extra.mkdir()
    for i in range(3):
        fmnist_rgb(200 + i, 32).save(extra / f"x{i}.jpg")
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 8)
    ckpt = tmp_path / "backbone.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    got = main(["--arch", "vit_tiny", "--patch_size", "8", "--data_path", str(data), "--imsize", "32",
                "--pretrained_weights", str(ckpt), "--checkpoint_key", "state_dict", "--use_cuda", "false",
                "--num_workers", "0", "--batch_size_per_gpu", "8", "--distractors_path", str(extra),
                "--whitening_path", str(data / "original"), "--output_dir", str(tmp_path)])["state_dict"]
    blocks = CopydaysBlocks(str(data))
    assert blocks.block_sizes[:2] == [3, 4] and blocks.positives["strong"][2] == [1]

    tf = copydays_transform(32)

    def feats(paths):
        with torch.no_grad():
            return torch.cat([copy_descriptor(model, ImageList(paths, tf)[i][0][None]) for i in range(len(paths))])

    db = torch.cat([feats(blocks.files["original"]), feats(sorted(str(p) for p in extra.iterdir()))])
    db, q = whiten(db, feats(blocks.query_files()), feats(blocks.files["original"]))
    _, idx = rank_top_k(db, q)
    want = block_map(idx, list(zip(BLOCK_NAMES, blocks.block_sizes)), blocks.positives)
    assert got == pytest.approx(want, abs=1e-9)
    assert got["original"] == pytest.approx(1.0)              # an original finds itself first
    out = capsys.readouterr().out
    assert "eval on original mAP=1.000" in out and "eval on crops/80 mAP=" in out
    assert (tmp_path / "copydays_state_dict.json").is_file()
    with pytest.raises(FileNotFoundError, match="lacks .*jpegqual"):
        main(["--data_path", str(tmp_path / "distractors")])
