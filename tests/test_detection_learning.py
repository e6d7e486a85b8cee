"""Detection learning outcome on the Fashion-MNIST COCO set (one garment of 28-40 px per 64-px canvas).

A few hundred CPU iterations of the detector on the pre-trained Fashion-MNIST teacher must lift the
box and mask AP far above the same detector before training (the baseline measured in the same
test). The detector is the lighter ``--detector mask_rcnn`` option (one stage of the cascade's heads)
with ``--layer_decay 0.3`` (the ViT nearly frozen), so that the run fits the CI budget; the cascade
itself is covered by the hand-computed tests and the resume test.

The teacher-versus-random-backbone comparison of the issue is NOT asserted: at this budget the
difference is within the seed-to-seed spread (measured figures in docs/object_detection.md).
"""
import os

import pytest
import torch

from ibot.data.fmnist_coco import build_fmnist_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "evaluation", "object_detection", "train.py")
ITERS = 200     # iterations of 2 canvases (150 gave box AP +2.4, too close to the +2 asserted)


def _train(data, out, weights, iters):
    import runpy
    threads, saved = torch.get_num_threads(), os.environ.get("CUDA_VISIBLE_DEVICES")
    torch.set_num_threads(1)
    try:
        ns = runpy.run_path(TRAIN)
        argv = ["--preset", "fmnist_tiny", "--data_path", data, "--output_dir", out, "--max_iters", str(iters),
                "--eval_every", str(max(iters, 1)), "--use_cuda", "false", "--num_workers", "0", "--num_vis", "4",
                "--print_freq", "50", "--detector", "mask_rcnn", "--layer_decay", "0.3",
                "--pretrained_weights", weights, "--checkpoint_key", "teacher"]
        metrics = ns["main"](ns["get_args_parser"]().parse_args(argv))
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return {f"{t}_{k}": 100 * m["stats"][k] for t, m in metrics.items() for k in ("AP", "AP50")}


@pytest.mark.slow
def test_detector_learns_on_the_pretrained_teacher(fmnist_teacher, tmp_path):
    assert (fmnist_teacher.arch, fmnist_teacher.patch_size) == ("vit_tiny", 8)
    data = str(tmp_path / "fmnist_coco")
    build_fmnist_coco(data, num_train=400, num_val=50, canvas=64, min_size=28, max_size=40, max_objects=1,
                      seed=0)
    before = _train(data, str(tmp_path / "untrained"), fmnist_teacher.checkpoint, 0)
    after = _train(data, str(tmp_path / "trained"), fmnist_teacher.checkpoint, ITERS)
    print(f"before training: {before}; after {ITERS} iterations: {after}")
    assert after["bbox_AP50"] >= before["bbox_AP50"] + 5, (before, after)
    assert after["bbox_AP"] >= before["bbox_AP"] + 2, (before, after)
    assert after["segm_AP50"] >= before["segm_AP50"] + 5, (before, after)
    assert os.path.getsize(tmp_path / "trained" / "predictions.png") > 1000
