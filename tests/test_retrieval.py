"""Revisited Oxford/Paris retrieval: the protocol on a hand-computed ranking, the restricted unpickler
of gnd_*.pkl, the multi-scale features, and the script end to end on a tiny folder."""
import os
import pickle

import numpy as np
import pytest
import torch

from ibot.eval.features import MULTISCALE_SCALES, frozen_features, multiscale_features
from ibot.eval.retrieval import (GroundTruthError, evaluate_revisited, load_ground_truth, rank_database,
                                 revisited_ground_truth)


def test_revisited_protocol_hand_computed():
    # 8 database images. Query 0: easy {1}, hard {3}, junk {2}; ranking 2 1 5 3 0 4 6 7.
    #   Medium: ok {1,3}, junk {2}: positions 1, 3 -> 0, 2 after junk removal: AP = 1/2 + 7/24 = 19/24,
    #           P@1 = 1, P@5 = P@10 = 2/3 (divided by the rank of the last positive, 3).
    #   Hard:   ok {3}, junk {2, 1}: position 3 -> 1: AP = (0 + 1/2)/2 = 1/4, P@1 = 0, P@5 = P@10 = 1/2.
    # Query 1: no positive at all -> skipped in both. Query 2: easy {0} ranked first, no hard -> Medium
    #   AP 1 and P@k 1, skipped in Hard.
    gnd = [{"easy": [1], "hard": [3], "junk": [2]}, {"easy": [], "hard": [], "junk": [4]},
           {"easy": [0], "hard": [], "junk": []}]
    ranks = np.array([[2, 1, 5, 3, 0, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7], [0, 5, 6, 7, 1, 2, 3, 4]]).T
    res = evaluate_revisited(ranks, gnd, ks=(1, 5, 10))
    assert res["mAP_M"] == pytest.approx(100 * (19 / 24 + 1) / 2)
    assert res["mAP_H"] == pytest.approx(25.0)
    assert res["mP@k_M"] == pytest.approx({1: 100.0, 5: 100 * 5 / 6, 10: 100 * 5 / 6})
    assert res["mP@k_H"] == pytest.approx({1: 0.0, 5: 50.0, 10: 50.0})
    hard = revisited_ground_truth(gnd, "hard")
    assert hard[0]["ok"].tolist() == [3] and sorted(hard[0]["junk"].tolist()) == [1, 2]


def test_rank_database_is_cosine_descending():
    db = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    q = torch.tensor([[0.0, 1.0], [3.0, 0.1]])
    assert rank_database(db, q).T.tolist() == [[1, 2, 0], [0, 2, 1]]


def test_ground_truth_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "gnd_roxford5k.pkl"
    bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(GroundTruthError, match="gnd_roxford5k.pkl.*refused to unpickle the global"):
        load_ground_truth(bad)
    assert not marker.exists()
    with pytest.raises(GroundTruthError, match="not found.*gnd_<dataset>.pkl"):
        load_ground_truth(tmp_path / "missing.pkl")
    bad.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3]}]}))
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\['easy'\] indexes outside"):
        load_ground_truth(bad)


def test_ground_truth_accepts_numpy_arrays(tmp_path):
    path = tmp_path / "gnd_rparis6k.pkl"
    cfg = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": np.array([1]), "hard": np.array([], int),
                                                            "junk": [0], "bbx": np.array([1.5, 2, 3, 4])}]}
    path.write_bytes(pickle.dumps(cfg, protocol=2))
    out = load_ground_truth(path)
    assert out["gnd"][0]["easy"].tolist() == [1] and out["gnd"][0]["junk"].dtype == np.int64


def test_multiscale_features_average_three_scales():
    from ibot.eval.features import build_backbone
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        got = multiscale_features(model, x)
        want = sum(frozen_features(model, x if s == 1 else torch.nn.functional.interpolate(
            x, scale_factor=s, mode="bilinear", align_corners=False)) for s in MULTISCALE_SCALES) / 3
    assert len(MULTISCALE_SCALES) == 3 and MULTISCALE_SCALES[1] == pytest.approx(2 ** -0.5)
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=1))


def test_retrieval_script_end_to_end(tmp_path, capsys):
    from evaluation.eval_image_retrieval import main
    from ibot.data.fmnist_toolbox import build_revisited, fmnist_rgb
    from ibot.eval.features import build_backbone
    torch.set_num_threads(1)
    data = tmp_path / "revisited"
    build_revisited(str(data), "roxford5k")
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in build_backbone("vit_tiny", 8).state_dict().items()}},
               ckpt)
    distractors = tmp_path / "r1m" / "sub"
    distractors.mkdir(parents=True)
    for i in range(3):
        fmnist_rgb(50 + i, (48, 40)).save(distractors / f"d{i}.jpg")
    args = ["--arch", "vit_tiny", "--patch_size", "8", "--data_path", str(data), "--dataset", "roxford5k",
            "--imsize", "48", "--multiscale", "true", "--use_cuda", "false", "--num_workers", "0",
            "--pretrained_weights", str(ckpt), "--distractors_path", str(tmp_path / "r1m"),
            "--output_dir", str(tmp_path / "out")]
    res = main(args)["teacher"]
    # the positives are exact copies of the queries: any network ranks them first
    assert res["mAP_M"] == pytest.approx(100.0) and res["mAP_H"] == pytest.approx(100.0)
    assert res["mP@k_M"][1] == pytest.approx(100.0)
    out = capsys.readouterr().out
    assert ">> roxford5k: mAP M: 100.00, H: 100.00" in out and "train: 9 imgs / query: 2 imgs" in out
    assert (tmp_path / "out" / "retrieval_roxford5k_teacher.json").is_file()
    with pytest.raises(GroundTruthError, match="rparis6k/gnd_rparis6k.pkl"):
        main([a if a != "roxford5k" else "rparis6k" for a in args])


@pytest.mark.slow
def test_run_sh_paris_oxford_reid(tmp_path):
    """run.sh TYPE paris_oxford_reid evaluates rparis6k then roxford5k with the official flags (CPU)."""
    import subprocess
    import sys
    from ibot.data.fmnist_toolbox import build_revisited
    from ibot.eval.features import build_backbone
    data = tmp_path / "revisited"
    for ds in ("rparis6k", "roxford5k"):
        build_revisited(str(data), ds)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"teacher": build_backbone("vit_tiny", 8).state_dict()}, ckpt)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUTPUT_DIR=str(tmp_path / "job"), PRETRAINED=str(ckpt), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(repo, "run.sh"), "paris_oxford_reid", "job", "vit_tiny", "teacher", "0",
                           "--patch_size", "8", "--data_path", str(data), "--imsize", "48", "--multiscale", "false",
                           "--num_workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ">> rparis6k: mAP M: 100.00, H: 100.00" in proc.stdout and ">> roxford5k: mAP M: 100.00" in proc.stdout
    for ds in ("rparis6k", "roxford5k"):
        assert (tmp_path / "job" / "retrieval" / f"retrieval_{ds}_teacher.json").is_file()
