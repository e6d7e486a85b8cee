"""End-to-end pre-training, the checkpoint format, resume (ours and the official file) and bad flags."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_ibot
from ibot.utils.checkpoint import restart_from_checkpoint, safe_load
from ibot.train.flags import get_args_parser
from ibot.train.driver import build_networks, build_optimization, checkpoint_dict, wrap_and_init_teacher
from ibot.train.context import RunContext, make_context
from ibot.train.flags import complete_args
from ibot.train.step import iBOTTrainStep, unwrap
from official_fixtures import fixture_path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--out_dim", "512", "--head_hidden_dim", "256", "--head_bottleneck_dim", "64",
        "--shared_head", "true", "--norm_last_layer", "false", "--batch_size_per_gpu", "32",
        "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1", "--teacher_temp", "0.07",
        "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2", "--num_workers", "2", "--saveckp_freq", "1"]
LOG_KEYS = ["train_loss", "train_cls", "train_patch", "train_lr", "train_wd", "train_acc", "train_nmi",
            "train_ari", "train_fscore", "train_adjacc", "epoch"]


def parse(argv):
    return argparse.ArgumentParser("iBOT", parents=[get_args_parser()]).parse_args(argv)


@pytest.fixture(scope="module")
def trained_run(fmnist_folder, tmp_path_factory):
    """2 epochs of vit_tiny/8 on 100 Fashion-MNIST images (32 px; 3 steps of 32 per epoch), then
    --load_from for a third."""
    out = tmp_path_factory.mktemp("run")
    argv = TINY + ["--data_path", str(fmnist_folder(10, 5) / "train"), "--output_dir", str(out), "--epochs", "2"]
    main_ibot.main(argv)
    first = {name: (out / name).stat().st_mtime_ns for name in ("checkpoint.pth", "checkpoint0001.pth")}
    two_epochs = safe_load(out / "checkpoint.pth")
    main_ibot.main(argv[:-2] + ["--epochs", "3", "--load_from", "checkpoint.pth"])
    return out, two_epochs, first


@pytest.mark.slow
def test_end_to_end_files_and_resume(trained_run):
    out, two_epochs, _ = trained_run
    assert two_epochs["epoch"] == 2
    # Q11: checkpoint{epoch:04}.pth uses the 0-based epoch just finished; epoch 0 never gets one
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth", "checkpoint0001.pth",
                                                                  "checkpoint0002.pth"]
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]          # the resumed run trained epoch 2 only
    assert list(lines[0])[:len(LOG_KEYS)] == LOG_KEYS  # the official keys, in order, then the resource record
    assert list(lines[0])[len(LOG_KEYS):] == ["proc_rss_mib", "proc_open_fds"]
    assert lines[0]["train_adjacc"] == -1 and 0 <= lines[0]["train_nmi"] <= 1
    assert all(torch.isfinite(torch.tensor(line["train_loss"])) for line in lines)
    assert list((out / "tf_logs").glob("events.out.tfevents.*"))
    final = safe_load(out / "checkpoint.pth")
    assert final["epoch"] == 3
    assert not torch.equal(final["teacher"]["backbone.pos_embed"], two_epochs["teacher"]["backbone.pos_embed"])


@pytest.mark.slow
def test_checkpoint_format_is_official(trained_run):
    out, ckpt, _ = trained_run
    # the official keys first and in order (fp32 run: no fp16_scaler); resume state may follow them
    assert list(ckpt)[:6] == ["student", "teacher", "optimizer", "epoch", "args", "ibot_loss"]
    assert "fp16_scaler" not in ckpt
    assert all(k.startswith("module.backbone.") or k.startswith("module.head.") for k in ckpt["student"])
    assert all(k.startswith("backbone.") or k.startswith("head.") for k in ckpt["teacher"])
    assert "module.backbone.masked_embed" in ckpt["student"] and "backbone.masked_embed" not in ckpt["teacher"]
    for prefix, sd in (("module.head.", ckpt["student"]), ("head.", ckpt["teacher"])):
        for layer in ("last_layer", "last_layer2"):  # shared heads keep the duplicated last_layer2 entries
            assert sd[f"{prefix}{layer}.weight_g"].shape == (512, 1)
            assert sd[f"{prefix}{layer}.weight_v"].shape == (512, 64)
        assert not any("parametrizations" in k for k in sd)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].arch == "vit_tiny"
    assert set(ckpt["ibot_loss"]) == {"center", "center2"}
    assert ckpt["ibot_loss"]["center2"].shape == (1, 1, 512)
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]][1] == 0.0


@pytest.mark.slow
def test_our_checkpoint_resumes_to_the_same_state(trained_run):
    out, _, _ = trained_run
    ckpt = safe_load(out / "checkpoint.pth")
    args = ckpt["args"]
    ctx = make_context(args, precision="fp32")
    student, teacher = build_networks(args)
    student, teacher, teacher_without_ddp = wrap_and_init_teacher(student, teacher, ctx)
    ibot_loss, optimizer, scaler, _ = build_optimization(student, args, ctx, 4)
    restored = {"epoch": 0}
    restart_from_checkpoint(str(out / "checkpoint.pth"), run_variables=restored, student=student, teacher=teacher,
                            optimizer=optimizer, fp16_scaler=scaler, ibot_loss=ibot_loss)
    assert restored["epoch"] == 3
    again = checkpoint_dict(student, teacher, optimizer, 3, args, ctx, ibot_loss, scaler)
    for key in ("student", "teacher", "ibot_loss"):
        assert list(again[key]) == list(ckpt[key])
        for name in ckpt[key]:
            assert torch.equal(again[key][name], ckpt[key][name]), (key, name)
    saved_state, state = ckpt["optimizer"]["state"], again["optimizer"]["state"]
    assert saved_state.keys() == state.keys()
    for idx in saved_state:
        for name in saved_state[idx]:
            assert torch.equal(torch.as_tensor(saved_state[idx][name]), torch.as_tensor(state[idx][name]))


def _official_small_networks():
    """The 2-block ViT (img 32, patch 8, dim 48, 3 heads) + shared heads of official_checkpoint.pth."""
    from ibot.models.head import iBOTHead
    from ibot.models.vision_transformer import VisionTransformer
    from ibot.models.wrapper import MultiCropWrapper

    def vit(**kw):
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True,
                                 return_all_tokens=True, **kw)
    head = dict(patch_out_dim=64, hidden_dim=32, bottleneck_dim=16, shared_head=True)
    student = MultiCropWrapper(vit(masked_im_modeling=True, drop_path_rate=0.1),
                               iBOTHead(48, 64, norm_last_layer=False, **head))
    teacher = MultiCropWrapper(vit(), iBOTHead(48, 64, **head))
    return student, teacher


def test_official_checkpoint_resumes_in_our_training():
    path = fixture_path("official_checkpoint.pth")
    official = safe_load(path)
    args = complete_args(official["args"])  # the official Namespace lacks this repository's flags
    args.global_crops_size, args.local_crops_size = 32, 16
    args.local_crops_number, args.local_crops_scale = 2, (0.05, 0.4)
    ctx = RunContext(device=torch.device("cpu"), precision="fp32", train_step="fast")
    student, teacher = _official_small_networks()
    student, teacher, teacher_without_ddp = wrap_and_init_teacher(student, teacher, ctx)
    ibot_loss, optimizer, scaler, schedules = build_optimization(student, args, ctx, 1)
    restored = {"epoch": 0}
    restart_from_checkpoint(str(path), run_variables=restored, student=student, teacher=teacher,
                            optimizer=optimizer, fp16_scaler=scaler, ibot_loss=ibot_loss)
    assert restored["epoch"] == official["epoch"]
    for name, value in official["student"].items():
        assert torch.equal(student.state_dict()[name[len("module."):]], value), name
    for name, value in official["teacher"].items():
        assert torch.equal(teacher.state_dict()[name], value), name
    torch.testing.assert_close(ibot_loss.center, official["ibot_loss"]["center"])
    # Adam moments line up by position with our parameter order
    loaded = optimizer.state_dict()["state"]
    assert loaded.keys() == official["optimizer"]["state"].keys()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, state in loaded.items():
        assert state["exp_avg"].shape == params[idx].shape
    # ... and training continues from there
    torch.manual_seed(0)
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    masks = [torch.rand(4, 4, 4) < 0.3 for _ in range(2)]
    before = teacher.state_dict()["backbone.cls_token"].clone()
    step = iBOTTrainStep.from_args(student, teacher, teacher_without_ddp, ibot_loss, args, ctx, scaler)
    losses, *_ = step.train_step(optimizer, images, masks, 0, 0, schedules)
    assert torch.isfinite(losses["loss"])
    assert not torch.equal(teacher.state_dict()["backbone.cls_token"], before)


def _expected_backbone_keys(depth, student):
    keys = ["cls_token", "pos_embed"] + (["masked_embed"] if student else []) + ["patch_embed.proj.weight",
                                                                                 "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")]
    return keys + ["norm.weight", "norm.bias"]


HEAD_KEYS = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
             "last_layer.weight_g", "last_layer.weight_v", "last_layer2.weight_g", "last_layer2.weight_v"]


@pytest.mark.parametrize("arch,dim", [("vit_small", 384), ("vit_base", 768)])
@pytest.mark.parametrize("shared", ["true", "false"])
def test_wrapped_key_names_and_shapes_are_official(arch, dim, shared):
    args = parse(["--arch", arch, "--shared_head", shared, "--data_path", "."])
    with torch.device("meta"):
        student, teacher = build_networks(args)
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert list(s_sd) == ["backbone." + k for k in _expected_backbone_keys(12, True)] + ["head." + k for k in HEAD_KEYS]
    assert list(t_sd) == ["backbone." + k for k in _expected_backbone_keys(12, False)] + ["head." + k for k in HEAD_KEYS]
    expected_shapes = {"backbone.cls_token": (1, 1, dim), "backbone.pos_embed": (1, 197, dim),
                       "backbone.masked_embed": (1, dim), "backbone.patch_embed.proj.weight": (dim, 3, 16, 16),
                       "backbone.blocks.11.attn.qkv.weight": (3 * dim, dim),
                       "backbone.blocks.0.mlp.fc1.weight": (4 * dim, dim), "head.mlp.0.weight": (2048, dim),
                       "head.mlp.2.weight": (2048, 2048), "head.mlp.4.weight": (256, 2048),
                       "head.last_layer.weight_g": (8192, 1), "head.last_layer.weight_v": (8192, 256),
                       "head.last_layer2.weight_g": (8192, 1), "head.last_layer2.weight_v": (8192, 256)}
    for name, shape in expected_shapes.items():
        assert tuple(s_sd[name].shape) == shape, name
        if name != "backbone.masked_embed":
            assert tuple(t_sd[name].shape) == shape, name
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    # named_parameters de-duplicates a shared last layer; norm_last_layer (default) freezes the gains
    assert any("last_layer2" in n for n in trainable) == (shared == "false")
    assert not any("original0" in n or n.endswith("weight_g") for n in trainable)


BAD_FLAGS = [
    (["--pred_ratio", "0.3", "--pred_ratio_var", "0.4"], "--pred_ratio_var"),
    (["--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.1", "0.1"], "--pred_ratio_var"),
    (["--epochs", "20"], "--epochs"),
    (["--epochs", "40", "--pred_start_epoch", "15"], "--pred_start_epoch"),
    (["--global_crops_number", "1"], "--global_crops_number"),
    (["--global_crops_size", "100"], "--global_crops_size"),
    (["--local_crops_number", "2", "--local_crops_size", "90"], "--local_crops_size"),
    (["--arch", "swin_tiny"], "--patch_size"),
]


def _main_exit(argv, capsys):
    """Run ``main_ibot.main(argv)`` in this process; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main_ibot.main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra,flag", BAD_FLAGS, ids=[f for _, f in BAD_FLAGS])
def test_bad_flags_stop_before_training(tmp_path, fmnist_small, capsys, extra, flag):
    argv = ["--data_path", str(fmnist_small / "train"), "--output_dir", str(tmp_path)] + extra
    code, err = _main_exit(argv, capsys)
    assert code == 2 and flag in err and "Traceback" not in err
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_data_path(tmp_path, capsys, make):
    data = tmp_path / "data"
    if make == "empty":
        data.mkdir()
    code, err = _main_exit(["--data_path", str(data), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and str(data) in err and "Traceback" not in err


def test_bad_flag_on_the_command_line_exits_2_without_traceback(tmp_path, fmnist_small):
    """The same checks seen from a shell (one subprocess; the cases above run in-process)."""
    argv = ["--data_path", str(fmnist_small / "train"), "--output_dir", str(tmp_path), "--epochs", "20"]
    proc = subprocess.run([sys.executable, str(REPO / "main_ibot.py")] + argv, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoint.pth").exists()


def test_parser_keeps_official_defaults():
    args = parse([])
    official = dict(arch="vit_small", patch_size=16, window_size=7, out_dim=8192, patch_out_dim=8192,
                    shared_head=False, shared_head_teacher=True, norm_last_layer=True, momentum_teacher=0.996,
                    norm_in_head=None, act_in_head="gelu", use_masked_im_modeling=True, pred_ratio=0.3,
                    pred_ratio_var=0, pred_shape="block", pred_start_epoch=0, lambda1=1.0, lambda2=1.0,
                    warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_patch_temp=0.04,
                    teacher_patch_temp=0.07, warmup_teacher_temp_epochs=30, use_fp16=True, weight_decay=0.04,
                    weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=128, epochs=100, freeze_last_layer=1,
                    lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw", load_from=None, drop_path=0.1,
                    global_crops_number=2, global_crops_scale=(0.14, 1.0), local_crops_number=0,
                    local_crops_scale=(0.05, 0.4), data_path="/path/to/imagenet/train/", output_dir=".",
                    saveckp_freq=40, seed=0, num_workers=10, dist_url="env://", local_rank=0,
                    global_crops_size=224, local_crops_size=96)
    for name, value in official.items():
        assert getattr(args, name) == value, name
    assert parse(["--pred_ratio", "0", "0.3"]).pred_ratio == [0.0, 0.3]
    assert parse(["--arch", "deit_small"]).arch == "deit_small"
    assert parse(["--local-rank", "3"]).local_rank == 3
    with pytest.raises(SystemExit):
        parse(["--arch", "resnet50"])
    with pytest.raises(SystemExit):
        parse(["--shared_head", "maybe"])


def test_flat_folder_trains_without_label_metrics(tmp_path, fmnist_small):
    """Images directly in --data_path (no class sub-folders) train; the clustering monitors are skipped."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted((fmnist_small / "train").glob("*/*.png"))[:40]):
        (flat / f"{i}.png").write_bytes(png.read_bytes())
    out = tmp_path / "out"
    main_ibot.main(["--data_path", str(flat), "--output_dir", str(out), "--arch", "vit_tiny", "--patch_size", "8",
                    "--global_crops_size", "32", "--out_dim", "64", "--patch_out_dim", "64",
                    "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "20",
                    "--epochs", "1", "--warmup_teacher_temp_epochs", "0", "--warmup_epochs", "0",
                    "--num_workers", "0"])
    line = json.loads((out / "log.txt").read_text())
    assert "train_nmi" not in line and line["epoch"] == 0 and line["train_loss"] > 0
    assert safe_load(out / "checkpoint.pth")["epoch"] == 1


@pytest.mark.slow
def test_swin_tiny_short_epoch_with_masking(tmp_path, fmnist_folder):
    """One CPU epoch of swin_tiny with block masks on 64-px crops writes an official-format checkpoint;
    its teacher backbone then serves the k-NN protocol and the backbone extraction."""
    out, data = tmp_path / "swin", fmnist_folder(2, 1) / "train"  # 2 images per class: one batch of 20
    main_ibot.main(["--data_path", str(data), "--output_dir", str(out), "--arch", "swin_tiny",
                    "--patch_size", "4", "--window_size", "7", "--global_crops_size", "64", "--out_dim", "64",
                    "--patch_out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
                    "--pred_ratio", "0.5", "--batch_size_per_gpu", "20", "--epochs", "1",
                    "--warmup_teacher_temp_epochs", "0", "--warmup_epochs", "0", "--num_workers", "0"])
    ckpt = safe_load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and ckpt["args"].arch == "swin_tiny"
    assert "module.backbone.masked_embed" in ckpt["student"]
    assert "backbone.layers.0.blocks.0.attn.relative_position_index" in ckpt["teacher"]
    assert ckpt["ibot_loss"]["center2"].abs().sum() > 0
    line = json.loads((out / "log.txt").read_text())
    assert line["train_patch"] > 0  # masks were applied (ratio 0.5 on the 2x2 final-stage grid of 64 px)

    backbone_file = out / "backbone.pth"
    proc = subprocess.run([sys.executable, str(REPO / "extract_backbone_weights.py"), str(out / "checkpoint.pth"),
                           str(backbone_file), "--checkpoint_key", "teacher"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    from ibot.eval.features import build_backbone
    from ibot.eval.weights import load_pretrained_weights
    model = build_backbone("swin_tiny", 4, 7, 0)  # official 224-px shapes, as pre-training builds it
    load_pretrained_weights(model, str(backbone_file), "teacher", "swin_tiny", 4)
    assert torch.equal(model.state_dict()["norm.weight"], ckpt["teacher"]["backbone.norm.weight"])
