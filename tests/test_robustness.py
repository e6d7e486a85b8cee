"""Robustness analyses: RMS calibration error, AURRA, BG-Gap and mCE aggregation against hand-computed
values; the ImageNet-C, ImageNet-A and ImageNet-9 scripts end to end on tiny folders in their official
layouts, with a classifier whose answer is known (zero weights, one large bias)."""
import json
import os

import numpy as np
import pytest
import torch

from ibot.eval.robustness import (CORRUPTIONS, IN9_VARIATIONS, aurra, bg_gap, calib_err, composite,
                                  corruption_error, load_class_mapping, map_predictions, unnormalized_mce)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = [0.9, 0.8, 0.6, 0.7, 0.95, 0.5]
HITS = [1, 0, 1, 1, 1, 0]


def test_rms_calibration_error_official_binning():
    # sorted: (0.5,0) (0.6,1) | (0.7,1) (0.8,0) | (0.9,1) (0.95,1); bins of 2, the last skipped:
    # sqrt(2/6 * (0.55 - 0.5)^2 + 2/6 * (0.75 - 0.5)^2)
    assert calib_err(CONF, HITS, beta=2) == pytest.approx(np.sqrt((0.05 ** 2 + 0.25 ** 2) / 3))
    assert calib_err(CONF, HITS, beta=2, skip_last_bin=False) == pytest.approx(
        np.sqrt((0.05 ** 2 + 0.25 ** 2 + 0.075 ** 2) / 3))
    assert calib_err(CONF, HITS, p="1", beta=2) == pytest.approx((0.05 + 0.25) / 3)
    assert calib_err(CONF, HITS, p="infty", beta=2) == pytest.approx(0.25)
    # 7 samples, bins of 3: [0, 3) and [3, 7) (the last absorbs the remainder and is skipped)
    assert calib_err(CONF + [0.1], HITS + [0], beta=3) == pytest.approx(np.sqrt(3 / 7 * (0.4 - 1 / 3) ** 2))
    with pytest.raises(ValueError, match="at least beta"):
        calib_err(CONF, HITS)


def test_aurra_hand_computed():
    # most confident first: hits 1, 0, 0, 1 -> accuracies 1, 1/2, 1/3, 1/2
    assert aurra([0.9, 0.8, 0.6, 0.7], [1, 0, 1, 0]) == pytest.approx((1 + 0.5 + 1 / 3 + 0.5) / 4)


def test_mce_bg_gap_and_mapping():
    errors = {"a": [0.1, 0.2, 0.3, 0.4, 0.5], "b": [0.5] * 5}
    assert corruption_error(errors["a"]) == pytest.approx(0.3)
    assert unnormalized_mce(errors) == pytest.approx(0.4)
    assert unnormalized_mce({"a": 0.3, "b": 0.6}) == pytest.approx(0.45)
    assert len(CORRUPTIONS) == 19 and CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "saturate"
    assert bg_gap({"mixed_same": 86.2, "mixed_rand": 78.9, "original": 95.6}) == pytest.approx(7.3)
    mapping = load_class_mapping(os.path.join(REPO, "analysis", "backgrounds_challenge", "in_to_in9.json"))
    assert mapping.shape == (1000,) and mapping[151].item() == 0 and mapping[0].item() == 8 \
        and mapping[999].item() == -1
    assert map_predictions(torch.tensor([151, 999]), mapping).tolist() == [0, -1]
    with open(os.path.join(REPO, "analysis", "natural_adv_examples", "imagenet_a_classes.json")) as f:
        idx = json.load(f)["indices_in_1k"]
    assert len(idx) == 200 and idx[:3] == [6, 11, 13] and idx == sorted(idx)
    bgs, img, m = torch.zeros(2, 3, 2, 2), torch.ones(3, 2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(3, 2, 2)
    assert composite(bgs, img, m)[1, :, 0, 0].tolist() == [1, 1, 1] and composite(bgs, img, m)[1, :, 1, 1].sum() == 0


def _constant_classifier(path, index, bias=5.0):
    """A vit_tiny (patch 8, 32 px) linear-eval classifier that always answers ImageNet class ``index``."""
    from ibot.eval.classifiers import vit_tiny
    torch.manual_seed(0)
    model = vit_tiny(None, patch_size=8, num_classes=1000, img_size=32)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
        model.linear.bias[index] = bias
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, path)
    return str(path)


COMMON = ["--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--use_cuda", "false",
          "--num_workers", "0"]


@pytest.mark.slow
def test_imagenet_c_script(tmp_path, capsys):
    from analysis.corruptions_surf_variations.eval import main
    from ibot.data.fmnist_toolbox import build_imagenet_c
    torch.set_num_threads(1)
    build_imagenet_c(str(tmp_path / "imnet_c"), CORRUPTIONS)
    ckpt = _constant_classifier(tmp_path / "clf.pth", 0)
    res = main(COMMON + ["--checkpoint", ckpt, "--data", str(tmp_path / "imnet_c"), "--batch_size", "16",
                         "--output_dir", str(tmp_path)])
    # always class 0; severity s holds s images of class 0 and one of class 1 -> error 1/(s+1)
    want = [1 / (s + 1) for s in range(1, 6)]
    assert res["errors"]["fog"] == pytest.approx(want)
    assert res["mce"] == pytest.approx(np.mean(want))
    assert "mCE (unnormalized by AlexNet errors) (%): {:.2f}".format(100 * np.mean(want)) in capsys.readouterr().out
    assert (tmp_path / "imagenet_c.json").is_file()
    with pytest.raises(FileNotFoundError, match="<corruption>/<severity 1..5>/<wnid>"):
        main(COMMON + ["--data", str(tmp_path / "nowhere")])


def test_imagenet_a_script(tmp_path, capsys):
    from analysis.natural_adv_examples.eval import main
    from ibot.data.fmnist_toolbox import build_imagenet_a
    torch.set_num_threads(1)
    build_imagenet_a(str(tmp_path / "imnet_a"))
    ckpt = _constant_classifier(tmp_path / "clf.pth", 6, bias=2.0)     # 1k index 6 = ImageNet-A class 0
    res = main(COMMON + ["--checkpoint", ckpt, "--data", str(tmp_path / "imnet_a"), "--batch_size", "64"])
    assert res["accuracy"] == pytest.approx(1 / 200)
    conf = np.e ** 2 / (np.e ** 2 + 199)                                # softmax over the 200 columns
    assert res["confidence"] == pytest.approx([conf] * 200)
    # one bin of 100 (the second, last one is skipped): sqrt(100/200 * (conf - 1/100)^2)
    assert res["rms_calib_error"] == pytest.approx(abs(conf - 0.01) / np.sqrt(2))
    assert res["aurra"] == pytest.approx(aurra(res["confidence"], res["correct"]))
    out = capsys.readouterr().out
    assert "ImageNet-A Accuracy (%): 0.5" in out and "RMS Calib Error (%)" in out and "AURRA (%)" in out
    (tmp_path / "imnet_a" / "n00000000" / "0.JPEG").unlink()
    (tmp_path / "imnet_a" / "n00000000").rmdir()
    with pytest.raises(FileNotFoundError, match="199 class folders"):
        main(COMMON + ["--data", str(tmp_path / "imnet_a")])


def test_backgrounds_challenge_scripts(tmp_path, capsys):
    from analysis.backgrounds_challenge.challenge_eval import main as challenge
    from analysis.backgrounds_challenge.in9_eval import main as in9
    from ibot.data.fmnist_toolbox import build_in9
    torch.set_num_threads(1)
    root = tmp_path / "bg_challenge"
    build_in9(str(root), IN9_VARIATIONS)
    ckpt = _constant_classifier(tmp_path / "clf.pth", 151)             # 151 -> IN-9 class 0 (dog)
    res = in9(COMMON + ["--checkpoint", ckpt, "--data-path", str(root), "--output_dir", str(tmp_path)])
    assert set(res["accuracy"]) == set(IN9_VARIATIONS)
    assert res["accuracy"]["mixed_rand"] == pytest.approx(100 / 9)      # one image per class
    assert res["accuracy"]["mixed_same"] == pytest.approx(20.0)         # two of ten are class 0
    assert res["bg_gap"] == pytest.approx(20.0 - 100 / 9)
    ch = challenge(COMMON + ["--checkpoint", ckpt, "--data-path", str(root)])
    # the dog foreground is never misclassified, the 8 others always
    assert (ch["vulnerable"], ch["total"]) == (8, 9)
    assert ch["challenge_accuracy"] == pytest.approx(100 / 9)
    out = capsys.readouterr().out
    assert "Accuracy on mixed_same is 20.00%" in out and "Summary: 8/9 (88.89%) are vulnerable" in out
    with pytest.raises(FileNotFoundError, match="<variation>/val/<class>"):
        in9(COMMON + ["--data-path", str(tmp_path / "nowhere")])


WRAPPERS = {   # spec 3.11: script -> (program, hard-coded arguments) per launched command
    "visualize_attn_map.sh": [("attention_map/visualize_attention.py", "--arch vit_small --patch_size 16 "
                                                                       "--data_path data/imagenet/val")],
    "visualize_corresp.sh": [("correspondence/visualize_correspondence.py", "--arch vit_small --patch_size 16 "
                                                                             "--data_path data/imagenet/val")],
    "eval_linear_part.sh": [("linear_part/eval.py", "--arch vit_small --output_dir .linear_part "
                                                    "--data_path data/imagenet")],
    "eval_occlusion.sh": [("occlusion/eval.py", "--model_name vit_small --test_data data/imagenet/val --random_drop"),
                          ("occlusion/eval.py", "--model_name vit_small --test_data data/imagenet/val --dino")],
    "eval_shuffle.sh": [("occlusion/eval.py", "--model_name vit_small --test_data data/imagenet/val --shuffle "
                                              "--shuffle_h 2 2 4 4 8 14 16 --shuffle_w 2 4 4 8 8 14 16")],
    "eval_corr_surf_vari.sh": [("corruptions_surf_variations/eval.py", "--arch vit_small --checkpoint C.pth "
                                                                       "--data data/imnet_c")],
    "eval_natural_adv_examp.sh": [("natural_adv_examples/eval.py", "--arch vit_small --checkpoint C.pth "
                                                                   "--data data/imnet_a/imagenet-a")],
    "eval_bg_challenge.sh": [("backgrounds_challenge/challenge_eval.py", "--arch vit_small --checkpoint C.pth "
                                                                         "--data-path data/imnet_bg/bg_challenge"),
                             ("backgrounds_challenge/in9_eval.py", "--arch vit_small --checkpoint C.pth "
                                                                   "--data-path data/imnet_bg/bg_challenge")],
}


@pytest.mark.parametrize("script", sorted(WRAPPERS))
def test_wrapper_scripts_are_thin_launchers(script):
    """Each wrapper runs its program(s) with the official hard-coded flags and passes EVERY argument on."""
    import subprocess
    repo = REPO
    env = dict(os.environ, PYTHON="echo", CHECKPOINT="C.pth", GPUS="2")
    out = subprocess.run(["bash", os.path.join(repo, "analysis", script), "--first", "x y"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert len(out) == len(WRAPPERS[script])
    for line, (program, fixed) in zip(out, WRAPPERS[script]):
        assert os.path.join(repo, "analysis", program) in line
        assert line.endswith(f"{fixed} --first x y"), line


TOOLBOX_SCRIPTS = ["evaluation/eval_image_retrieval.py", "evaluation/eval_copy_detection.py",
                   "evaluation/eval_video_segmentation.py", "analysis/corruptions_surf_variations/eval.py",
                   "analysis/natural_adv_examples/eval.py", "analysis/natural_adv_examples/calibration_tools.py",
                   "analysis/backgrounds_challenge/in9_eval.py", "analysis/backgrounds_challenge/challenge_eval.py"]
COMMON_FLAGS = ("--pretrained_weights", "--arch", "--patch_size", "--checkpoint_key", "--window_size",
                "--avgpool_patchtokens", "--n_last_blocks", "--data_path", "--batch_size_per_gpu", "--num_workers",
                "--dist_url", "--local_rank", "--resize_size", "--crop_size")


@pytest.mark.parametrize("script", TOOLBOX_SCRIPTS)
def test_toolbox_scripts_follow_the_house_rules(script):
    """The issue-13 rules: common flags only from ibot/eval/flags.py, no import of another script or of a
    top-level door, no sys.path; --arch takes the registry's ViTs."""
    import ast
    import importlib
    src = open(os.path.join(REPO, script)).read()
    for node in ast.walk(ast.parse(src)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert name.split(".")[0] not in ("evaluation", "analysis", "benchmarks", "tools", "models", "utils",
                                              "loader", "main_ibot"), (script, name)
    assert "sys.path" not in src
    for flag in COMMON_FLAGS:
        assert f'add_argument("{flag}"' not in src, (script, flag)
    module = importlib.import_module(script[:-3].replace("/", "."))
    if hasattr(module, "get_args_parser"):
        from ibot.models import arch_choices
        parser = module.get_args_parser()
        arch = next(a for a in parser._actions if "--arch" in a.option_strings)
        assert list(arch.choices) == arch_choices("vit")
