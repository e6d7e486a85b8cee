"""Issue 13, evaluation side: the parent parsers of ``ibot/eval/flags.py`` give every script the flags it
had (names, types, defaults), the scripts declare no common flag themselves, no script imports another
script or touches ``sys.path``, and the merged ``cosine_scheduler`` reproduces both old functions."""
import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ibot.eval.flags import backbone_parser, data_parser, features_parser, launch_parser
from ibot.models import arch_choices
from ibot.train.schedules import cosine_scheduler

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).resolve().parent / "fixtures" / "issue13"
OLD_FLAGS = json.loads((SNAPSHOTS / "script_flags.json").read_text())
COMMON = ("--pretrained_weights", "--arch", "--patch_size", "--checkpoint_key", "--window_size",
          "--avgpool_patchtokens", "--n_last_blocks", "--data_path", "--batch_size_per_gpu", "--num_workers",
          "--dist_url", "--local_rank", "--resize_size", "--crop_size")
ARCH_FLAGS = ("--arch", "--model_name", "--attention_arch", "--dino_arch")
SCRIPT_DIRS = ("evaluation", "analysis", "benchmarks", "tools")


def _module(script):
    return importlib.import_module(script[:-3].replace("/", "."))


def _flags(parser):
    out = {}
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            out[a.option_strings[0]] = a
    return out


def _type_name(action):
    # argparse's default converter (None) and ``str`` parse the same way
    return "str" if action.type in (None, str) else getattr(action.type, "__name__", repr(action.type))


@pytest.mark.parametrize("script", sorted(OLD_FLAGS))
def test_script_keeps_its_flags(script):
    """Every flag a script had before the parent parsers: same option strings, dest, type, default,
    nargs and required; --arch-like choices are the registry's and equal the old hard-written lists."""
    new = _flags(_module(script).get_args_parser())
    old = OLD_FLAGS[script]
    assert set(new) == set(old), (script, set(new) ^ set(old))
    for name, o in old.items():
        a = new[name]
        assert a.option_strings == o["options"] and a.dest == o["dest"], (script, name)
        assert _type_name(a) == ("str" if o["type"] in (None, "str") else o["type"]), (script, name)
        default = list(a.default) if isinstance(a.default, tuple) else a.default  # JSON keeps lists only
        assert default == o["default"], (script, name, a.default, o["default"])
        assert a.nargs == o["nargs"] and a.required == o["required"], (script, name)
        if name in ARCH_FLAGS:
            family = "vit" if (o["choices"] is not None and len(o["choices"]) == 4) else None
            assert list(a.choices) == arch_choices(family), (script, name)
            if o["choices"] is not None:
                assert list(a.choices) == o["choices"], (script, name)
        else:
            assert (list(a.choices) if a.choices is not None else None) == o["choices"], (script, name)


def test_parent_parsers_defaults_and_types():
    """The factories' flags by hand: the official defaults and the per-script overrides."""
    ns = backbone_parser().parse_args([])
    assert vars(ns) == {"arch": "vit_small", "patch_size": 16, "window_size": 7, "pretrained_weights": "",
                        "checkpoint_key": "teacher"}
    ns = backbone_parser(patch_size=8, window_size=None, family="vit", pretrained_weights=False,
                         checkpoint_key=None).parse_args(["--arch", "vit_tiny", "--patch_size", "4"])
    assert vars(ns) == {"arch": "vit_tiny", "patch_size": 4}
    with pytest.raises(SystemExit):
        backbone_parser(family="vit").parse_args(["--arch", "swin_tiny"])
    assert vars(features_parser(n_last_blocks=4).parse_args([])) == {"n_last_blocks": 4, "avgpool_patchtokens": 0}
    assert vars(data_parser(image_sizes=True).parse_args([])) == {
        "data_path": "/path/to/imagenet/", "batch_size_per_gpu": 128, "num_workers": 10, "resize_size": 256,
        "crop_size": 224}
    assert vars(data_parser(None, 2, "--batch_size", 0).parse_args(["--batch_size", "3"])) == {
        "data_path": None, "batch_size": 3, "num_workers": 0}
    assert vars(launch_parser(local_rank=-1).parse_args(["--local-rank", "2"])) == {"dist_url": "env://",
                                                                                 "local_rank": 2}


def test_registered_arch_is_a_choice_of_every_script():
    """A model registered through the registry is accepted by the scripts' --arch (no list to edit)."""
    from ibot.models import register_model, unregister_model
    from ibot.models.vision_transformer import vit_tiny

    register_model(lambda **kw: vit_tiny(**kw), name="vit_issue13_probe")
    try:
        for script in ("evaluation/eval_knn.py", "evaluation/eval_linear.py", "evaluation/eval_cls.py",
                       "analysis/attention_map/visualize_attention.py"):
            args = _module(script).get_args_parser().parse_args(["--arch", "vit_issue13_probe"])
            assert args.arch == "vit_issue13_probe"
    finally:
        unregister_model("vit_issue13_probe")


# the scripts restructured by issue 13 (the issue-14..17 scripts are held to the same rules by their own tests)
RESTRUCTURED = sorted(OLD_FLAGS) + [
    "evaluation/classification_layer_decay/engine_for_finetuning.py",
    "evaluation/classification_layer_decay/extract_backbone_weights.py",
    "evaluation/classification_layer_decay/modeling_finetune.py",
    "evaluation/classification_layer_decay/optim_factory.py", "analysis/combine_ckpt.py",
    "analysis/imagenet_models.py", "analysis/mask_viewer/visualize_masks.py", "benchmarks/masks.py",
    "benchmarks/train_step.py", "tools/make_fmnist.py", "extract_backbone_weights.py"]
DOORS = ("models", "utils", "loader", "main_ibot")


def test_scripts_declare_no_common_flag_and_import_only_ibot():
    """Common flags come only from ibot/eval/flags.py; the scripts import neither each other nor the
    top-level doors; no script and no test touches sys.path."""
    for rel in RESTRUCTURED:
        src = (ROOT / rel).read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in SCRIPT_DIRS + DOORS, (rel, name)
        if rel in OLD_FLAGS and "/classification_layer_decay/" not in rel:  # the evaluation / analysis scripts
            for flag in COMMON:
                assert f'add_argument("{flag}"' not in src, (rel, flag)
    for path in [ROOT / rel for rel in RESTRUCTURED] + sorted((ROOT / "tests").glob("*.py")):
        assert not _touches_sys_path(path.read_text()), path


def _touches_sys_path(src):
    """True when the code (not a string in it) reads or changes ``sys.path``."""
    return any(isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys" for node in ast.walk(ast.parse(src)))


@pytest.mark.slow
def test_script_help_runs_from_another_directory(tmp_path):
    """``python path/to/script.py --help`` works from any directory without PYTHONPATH (the package is
    installed; the script imports only ``ibot``). One script stands for all: the others import the
    same way, which test_scripts_declare_no_common_flag_and_import_only_ibot checks."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "analysis/linear_part/eval.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--pretrained_weights" in proc.stdout and "--sweep_lr_only" in proc.stdout


@pytest.mark.parametrize("case", json.loads((SNAPSHOTS / "cosine_schedules.json").read_text()),
                         ids=lambda c: f"{c['kind']}-{c['args']}-{c['kwargs']}")
def test_one_cosine_scheduler_reproduces_both_old_ones(case):
    """The merged function equals, bit for bit, the official pre-training schedule and the BEiT
    fine-tuning variant (warmup_steps, fractional epochs, warm-up longer than the run)."""
    values = cosine_scheduler(*case["args"], **case["kwargs"])
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, np.asarray(case["values"], dtype=np.float64))


def test_cosine_scheduler_by_hand():
    """warm-up 0 -> 1 over 2 iterations then 0.5 (1 + cos(pi i / 2)), i = 0, 1; a 1-step warm-up is [start]
    (np.linspace), then 0.5 (1 + cos(pi i / 3)), i = 0..2."""
    np.testing.assert_allclose(cosine_scheduler(1.0, 0.0, 2, 2, warmup_epochs=1), [0.0, 1.0, 1.0, 0.5], atol=1e-15)
    np.testing.assert_allclose(cosine_scheduler(1.0, 0.0, 2, 2, warmup_steps=1), [0.0, 1.0, 0.75, 0.25],
                               atol=1e-15)
