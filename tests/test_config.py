"""Recipes as files: ``main_ibot.py --config FILE`` (YAML, safe loading), command-line flags override
the file, bad files are named errors, and the resolved flags are written beside the run."""
import argparse
import json
import os

import pytest

from ibot.train.config import ConfigFileError, list_recipes, load_config, parse_with_config, recipe_argv
from ibot.train.flags import get_args_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser():
    return argparse.ArgumentParser("iBOT", parents=[get_args_parser()])


def test_every_recipe_parses_and_the_readme_recipe_is_official(tmp_path):
    assert {"vit_small_16_800ep", "vit_base_16", "swin_tiny_14", "small_image_fmnist"} <= set(list_recipes())
    for name in list_recipes():  # configs/ at the repository root is the same folder
        args = parse_with_config(_parser(), ["--config", os.path.join(REPO, "configs", name + ".yaml")])
        assert args.config.endswith(name + ".yaml")
    args = parse_with_config(_parser(), ["--config", os.path.join(REPO, "configs", "vit_small_16_800ep.yaml")])
    assert (args.arch, args.epochs, args.batch_size_per_gpu, args.out_dim, args.local_crops_number) == \
        ("vit_small", 800, 64, 8192, 10)
    assert args.shared_head is True and args.norm_last_layer is False
    assert args.global_crops_scale == [0.25, 1.0] and args.pred_ratio == [0.0, 0.3]
    assert args.lr == 5e-4 and args.momentum_teacher == 0.996  # not in the file: official defaults


def test_command_line_overrides_the_file():
    path = os.path.join(REPO, "configs", "vit_small_16_800ep.yaml")
    args = parse_with_config(_parser(), ["--config", path, "--epochs", "3", "--shared_head", "false"])
    assert args.epochs == 3 and args.shared_head is False and args.out_dim == 8192


def test_small_image_recipe_file_is_the_demo_recipe():
    from ibot.demo import SMALL_IMAGE_RECIPE
    assert SMALL_IMAGE_RECIPE == recipe_argv("small_image_fmnist")
    via_file = parse_with_config(_parser(), ["--config", os.path.join(REPO, "configs", "small_image_fmnist.yaml")])
    via_flags = _parser().parse_args(SMALL_IMAGE_RECIPE)
    assert {k: v for k, v in vars(via_file).items() if k != "config"} == \
        {k: v for k, v in vars(via_flags).items() if k != "config"}


@pytest.mark.parametrize("text,message", [
    ("epochs: 3\nno_such_flag: 1\n", "unknown flag(s) no_such_flag"),
    ("optimizer: adam\n", "not one of the choices of --optimizer"),
    ("shared_head: maybe\n", "shared_head"),
    ("epochs: [1, 2]\n", "takes one value"),
    ("- epochs\n", "a mapping"),
    ("epochs: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_config(str(path), _parser())
    assert str(path) in str(err.value)


def test_missing_config_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        parse_with_config(_parser(), ["--config", str(tmp_path / "nope.yaml")])
    assert err.value.code == 2 and "nope.yaml: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_resolved_flags_are_written_beside_the_run(fmnist_small, tmp_path):
    from ibot.train.driver import train_ibot
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("arch: vit_tiny\npatch_size: 8\nglobal_crops_size: 32\nlocal_crops_number: 0\nout_dim: 64\n"
                   "shared_head: true\nhead_hidden_dim: 32\nhead_bottleneck_dim: 16\nbatch_size_per_gpu: 100\n"
                   "epochs: 1\nwarmup_epochs: 0\nwarmup_teacher_temp_epochs: 0\nnum_workers: 0\n")
    out = tmp_path / "run"
    args = parse_with_config(_parser(), ["--config", str(cfg), "--data_path", str(fmnist_small / "train"),
                                         "--output_dir", str(out), "--lr", "0.001"])
    before = vars(args).copy()
    train_ibot(args)
    assert vars(args) == before  # the driver does not write into args
    written = json.loads((out / "args.json").read_text())
    assert written["lr"] == 0.001 and written["out_dim"] == 64 and written["arch"] == "vit_tiny"
    assert "config" not in written and written["epochs"] == 1
