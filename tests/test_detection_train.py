"""Detection end to end on the Fashion-MNIST COCO set: kill + resume = uninterrupted run, test.py
reproduces the AP printed by training, and records; clear errors before training."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ibot.data.fmnist_coco import build_fmnist_coco
from ibot.utils.checkpoint import safe_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "evaluation", "object_detection", "train.py")
TEST = os.path.join(ROOT, "evaluation", "object_detection", "test.py")


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """8 training canvases (7 with garments: 4 iterations per epoch at 2 images) and 6 validation ones."""
    root = str(tmp_path_factory.mktemp("fmnist_coco_tiny"))
    build_fmnist_coco(root, num_train=8, num_val=6, canvas=64, empty_every=8, seed=0)
    return root


def _flags(data, out, *extra):
    return ["--preset", "fmnist_tiny", "--data_path", data, "--output_dir", out, "--max_iters", "6",
            "--save_every", "1", "--eval_every", "6", "--use_cuda", "false", "--num_workers", "0",
            "--num_vis", "2", "--print_freq", "2", *extra]


def _run_in_process(module_path, argv):
    """``main(get_args_parser().parse_args(argv))`` of a script, on one thread; the
    ``CUDA_VISIBLE_DEVICES`` that ``--use_cuda false`` sets is put back afterwards."""
    import runpy
    threads, saved = torch.get_num_threads(), os.environ.get("CUDA_VISIBLE_DEVICES")
    torch.set_num_threads(1)
    try:
        namespace = runpy.run_path(module_path)
        return namespace["main"](namespace["get_args_parser"]().parse_args(argv))
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _ap_lines(text):
    return [line for line in text.splitlines() if line.startswith(("bbox AP:", "segm AP:"))]


@pytest.mark.slow
def test_kill_resume_matches_uninterrupted_and_test_reproduces(tiny_coco, tmp_path, capsys):
    full = str(tmp_path / "full")
    metrics = _run_in_process(TRAIN, _flags(tiny_coco, full))
    printed = capsys.readouterr().out
    lines = _ap_lines(printed)
    assert len(lines) >= 4 and lines[-2:] == lines[-4:-2]      # evaluation at 6 == final lines
    assert "Final checkpoint:" in printed and "eta:" in printed
    reference = safe_load(os.path.join(full, "checkpoint.pth"))
    assert reference["iteration"] == 6 and reference["epoch"] == 1

    # records
    record = [json.loads(x) for x in open(os.path.join(full, "log.txt"))]
    assert record[-1]["iteration"] == 6 and "bbox_AP" in record[-1] and "segm_AP50" in record[-1]
    results = json.load(open(os.path.join(full, "results.json")))
    assert results["metrics"]["bbox"]["AP"] == pytest.approx(metrics["bbox"]["stats"]["AP"])
    assert os.path.getsize(os.path.join(full, "predictions.png")) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(full, "tf_logs")))

    # test.py on the final checkpoint prints the same AP lines
    tested = _run_in_process(TEST, _flags(tiny_coco, str(tmp_path / "test"), "--checkpoint",
                                          os.path.join(full, "checkpoint.pth")))
    assert _ap_lines(capsys.readouterr().out)[-2:] == lines[-2:]
    assert {t: m["stats"] for t, m in tested.items()} == {t: m["stats"] for t, m in metrics.items()}

    # kill -9 once a checkpoint exists, resume, compare every tensor
    killed = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, TRAIN] + _flags(tiny_coco, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoint.pth")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    done = safe_load(ckpt)["iteration"]
    assert 1 <= done < 6
    _run_in_process(TRAIN, _flags(tiny_coco, killed, "--auto_resume", "true"))
    out = capsys.readouterr().out
    assert f"Resumed from {ckpt} at iteration {done}" in out
    assert _ap_lines(out)[-2:] == lines[-2:]
    resumed = safe_load(ckpt)
    assert resumed["iteration"] == 6
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_clear_errors_before_training(tiny_coco, tmp_path):
    from ibot.eval.weights import PretrainedWeightsError
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        _run_in_process(TRAIN, _flags(str(tmp_path / "nowhere"), str(tmp_path / "o1")))
    other = create_other_arch_file(tmp_path)
    with pytest.raises(PretrainedWeightsError, match="does not match"):
        _run_in_process(TRAIN, _flags(tiny_coco, str(tmp_path / "o2"), "--pretrained_weights", other,
                                      "--checkpoint_key", "state_dict"))
    assert not os.path.exists(tmp_path / "o2" / "checkpoint.pth")


def create_other_arch_file(tmp_path):
    """A vit_small/16 backbone file (the fmnist_tiny preset is vit_tiny/8)."""
    from ibot.models import create_model
    path = str(tmp_path / "vit_small.pth")
    torch.save({"state_dict": create_model("vit_small", patch_size=16).state_dict()}, path)
    return path
