"""Fine-tuning: layer-decay groups, schedules, sampler, checkpoint loading and 1-epoch runs of the
three fine-tuning scripts (BEiT layer decay, DeiT transfer, semi-supervised) with resume."""
import argparse
import builtins
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models
from evaluation import eval_cls
from evaluation.classification_layer_decay import modeling_finetune, run_class_finetuning
from evaluation.classification_layer_decay.optim_factory import create_optimizer, get_num_layer_for_vit
from evaluation.semi_supervised import eval_cls as semi_eval_cls
from ibot.utils.checkpoint import safe_load
from ibot.eval.finetune import GradScalerWithNorm, RASampler, epoch_cosine_value, train_one_epoch
from ibot.eval.layer_decay import get_layer_id_for_swin, get_layer_id_for_vit, param_groups_layer_decay
from ibot.train.schedules import cosine_scheduler
from ibot.models.head import iBOTHead


@pytest.fixture(autouse=True)
def _restore_print(monkeypatch):
    # init_distributed_mode replaces builtins.print; undo it after each test
    monkeypatch.setattr(builtins, "print", builtins.print)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, base in (("class_a", 40), ("class_b", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(8):
                arr = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _tiny_vit_state():
    torch.manual_seed(0)
    return models.vit_tiny(patch_size=16, img_size=[32]).state_dict()


def _small_beit(depth=3, **kw):
    return modeling_finetune.VisionTransformer(img_size=32, patch_size=16, num_classes=2, embed_dim=16, depth=depth,
                                               num_heads=2, use_mean_pooling=False, **kw)


# ------------------------------------------------------------------------------------------ layer decay

def test_layer_ids_vit():
    L = 12
    assert get_layer_id_for_vit("cls_token", L) == 0
    assert get_layer_id_for_vit("pos_embed", L) == 0
    assert get_layer_id_for_vit("mask_token", L) == 0
    assert get_layer_id_for_vit("patch_embed.proj.weight", L) == 0
    assert get_layer_id_for_vit("blocks.0.attn.qkv.weight", L) == 1
    assert get_layer_id_for_vit("blocks.11.mlp.fc2.bias", L) == 12
    assert get_layer_id_for_vit("module.backbone.blocks.3.norm1.weight", L) == 4
    for name in ("norm.weight", "fc_norm.bias", "head.weight", "rel_pos_bias.relative_position_bias_table"):
        assert get_layer_id_for_vit(name, L) == L + 1
    # official signature: num_max_layer = L + 2
    assert get_num_layer_for_vit("blocks.5.norm2.weight", L + 2) == 6


def test_layer_ids_swin():
    depths = [2, 2, 6, 2]
    assert get_layer_id_for_swin("patch_embed.proj.weight", depths) == 0
    assert get_layer_id_for_swin("absolute_pos_embed", depths) == 0
    assert get_layer_id_for_swin("layers.0.blocks.0.attn.qkv.weight", depths) == 1
    assert get_layer_id_for_swin("layers.0.downsample.reduction.weight", depths) == 2
    assert get_layer_id_for_swin("layers.2.blocks.5.mlp.fc1.weight", depths) == 2 + 2 + 5 + 1
    assert get_layer_id_for_swin("layers.2.downsample.norm.weight", depths) == 10
    assert get_layer_id_for_swin("norm.weight", depths) == 13


def test_layer_decay_param_groups():
    model = _small_beit(depth=3)
    L, decay, wd = 3, 0.65, 0.05
    groups = param_groups_layer_decay(model, weight_decay=wd, skip_list=model.no_weight_decay(), layer_decay=decay,
                                      num_layers=L)
    by_name = {g["group_name"]: g for g in groups}
    seen = set()
    for g in groups:
        layer_id = int(g["group_name"].split("_")[1])
        assert math.isclose(g["lr_scale"], decay ** (L + 1 - layer_id))
        assert g["group_name"].endswith("no_decay") == (g["weight_decay"] == 0.0)
        for n, p in zip(g["param_names"], g["params"]):
            seen.add(n)
            assert get_layer_id_for_vit(n, L) == layer_id
            no_decay = p.ndim == 1 or n.endswith(".bias") or n in ("pos_embed", "cls_token")
            assert (g["weight_decay"] == 0.0) == no_decay, n
    assert seen == {n for n, _ in model.named_parameters()}
    assert "pos_embed" in by_name["layer_0_no_decay"]["param_names"]
    assert "cls_token" in by_name["layer_0_no_decay"]["param_names"]
    assert "patch_embed.proj.weight" in by_name["layer_0_decay"]["param_names"]
    assert "blocks.1.norm1.weight" in by_name["layer_2_no_decay"]["param_names"]
    assert "head.weight" in by_name[f"layer_{L + 1}_decay"]["param_names"]
    assert by_name[f"layer_{L + 1}_decay"]["lr_scale"] == 1.0
    assert "norm.weight" in by_name[f"layer_{L + 1}_no_decay"]["param_names"]

    # create_optimizer: group lr = lr * scale; the per-step schedule multiplies by the scale too
    args = argparse.Namespace(opt="adamw", lr=1e-3, weight_decay=wd, opt_eps=1e-8, opt_betas=None, momentum=0.9)
    opt = create_optimizer(args, model, layer_decay=decay, num_layers=L)
    for g in opt.param_groups:
        assert math.isclose(g["lr"], 1e-3 * g["lr_scale"])


def test_groups_without_layer_decay_and_wrapper_prefix():
    backbone = models.vit_tiny(patch_size=16, img_size=[32])
    model = eval_cls.BackboneWithHead(backbone, eval_cls.new_linear_head(192, 2))
    groups = param_groups_layer_decay(model, weight_decay=0.05, skip_list=())
    assert sorted(g["group_name"] for g in groups) == ["decay", "no_decay"]
    decay = next(g for g in groups if g["group_name"] == "decay")
    # DeiT recipe parity: pos_embed / cls_token are decayed (no no_weight_decay on the backbone)
    assert "backbone.pos_embed" in decay["param_names"] and "backbone.cls_token" in decay["param_names"]
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, num_layers=12)
    by_name = {g["group_name"]: g for g in groups}
    assert "backbone.blocks.11.attn.qkv.weight" in by_name["layer_12_decay"]["param_names"]
    assert "head.weight" in by_name["layer_13_decay"]["param_names"]


# ------------------------------------------------------------------------------------------ schedules

def test_cosine_scheduler_values():
    s = cosine_scheduler(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2)
    assert len(s) == 50
    np.testing.assert_allclose(s[:10], np.linspace(0, 1.0, 10))
    assert s[10] == pytest.approx(1.0)
    n = 40
    for i in (0, 7, 39):
        assert s[10 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / n)))
    assert np.all(np.diff(s[10:]) <= 1e-12)
    s2 = cosine_scheduler(1.0, 0.0, epochs=4, niter_per_ep=5, warmup_epochs=2, warmup_steps=3)
    np.testing.assert_allclose(s2[:3], [0.0, 0.5, 1.0])
    assert s2[3] == pytest.approx(1.0)
    const = cosine_scheduler(0.05, 0.05, 3, 4)
    np.testing.assert_allclose(const, 0.05)


def test_epoch_cosine_value_matches_timm():
    from timm.scheduler import CosineLRScheduler
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = CosineLRScheduler(opt, t_initial=20, lr_min=1e-3, warmup_lr_init=1e-4, warmup_t=5, cycle_limit=1)
    for e in range(25):
        sched.step(e)
        assert epoch_cosine_value(e, 0.1, 1e-3, 20, 5, 1e-4) == pytest.approx(opt.param_groups[0]["lr"])


def test_rasampler():
    data = list(range(600))
    s = RASampler(data, num_replicas=2, rank=0)
    s.set_epoch(3)
    idx = list(s)
    assert len(idx) == len(s) == 512 // 2
    # each index appears in runs of the repeat count across the two ranks
    full = list(RASampler(data, num_replicas=1, rank=0))
    assert len(full) == 512 and full[0] == full[1] == full[2]
    small = RASampler(list(range(16)), num_replicas=1, rank=0)
    assert len(list(small)) == len(small) == 16


def test_train_loop_applies_step_schedule():
    torch.manual_seed(0)
    model = _small_beit(depth=2)
    args = argparse.Namespace(opt="adamw", lr=1.0, weight_decay=0.05, opt_eps=1e-8, opt_betas=None, momentum=0.9)
    opt = create_optimizer(args, model, layer_decay=0.5, num_layers=2)
    loader = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(3)]
    lrs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    wds = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    stats = train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, opt, torch.device("cpu"), 1,
                            GradScalerWithNorm("cpu", enabled=False), max_norm=1.0, lr_schedule_values=lrs,
                            wd_schedule_values=wds, start_steps=3, num_training_steps_per_epoch=3, use_amp=False,
                            print_freq=100)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.6 * g["lr_scale"])
        assert g["weight_decay"] in (0.0, pytest.approx(0.06))
    assert math.isfinite(stats["loss"]) and stats["lr"] == pytest.approx(0.5)  # epoch average


# ------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("wrap", ["flat", "state_dict", "model", "module_prefix"])
def test_load_finetune_checkpoint_formats(tmp_path, wrap):
    sd = _tiny_vit_state()
    if wrap == "flat":
        obj = sd
    elif wrap == "state_dict":
        obj = {"state_dict": sd}
    elif wrap == "model":
        obj = {"model": sd, "epoch": 3}
    else:
        obj = {"module": {"module.backbone." + k: v for k, v in sd.items()}}
    path = tmp_path / "bb.pth"
    torch.save(obj, path)
    model = modeling_finetune.create_model("vit_tiny", img_size=32, num_classes=2, use_mean_pooling=False,
                                           use_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0.0)
    missing, _ = modeling_finetune.load_finetune_checkpoint(model, str(path))
    assert sorted(missing) == ["head.bias", "head.weight"]
    msd = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(msd[k], v), k
    # same maths as the iBOT backbone
    backbone = models.vit_tiny(patch_size=16, img_size=[32])
    backbone.load_state_dict(sd)
    model.eval()
    backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), backbone(x), rtol=1e-4, atol=1e-5)


def test_load_finetune_checkpoint_errors_and_resize(tmp_path):
    sd = _tiny_vit_state()
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.3.")}, path)
    model = modeling_finetune.create_model("vit_tiny", img_size=32, num_classes=2, use_mean_pooling=False,
                                           use_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0.0)
    with pytest.raises(RuntimeError, match="backbone parameters"):
        modeling_finetune.load_finetune_checkpoint(model, str(path))
    # pos_embed resized to a 4x4 grid (64 px), mean pooling model, per-block relative bias
    torch.save({"model": sd}, path)
    big = modeling_finetune.create_model("vit_tiny", img_size=64, num_classes=3, use_mean_pooling=True,
                                         use_rel_pos_bias=True, use_abs_pos_emb=True, init_values=0.1)
    missing, unexpected = modeling_finetune.load_finetune_checkpoint(big, str(path))
    assert big.pos_embed.shape == (1, 17, 192)
    assert "norm.weight" in unexpected
    assert all(k.startswith(("head.", "fc_norm.")) or "relative_position" in k or "gamma" in k for k in missing)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 3)


# ------------------------------------------------------------------------------------------ scripts

def _log_epochs(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


def _parse(parser_fn, argv):
    return argparse.ArgumentParser(parents=[parser_fn()]).parse_args(argv)


def test_run_class_finetuning_one_epoch_and_resume(tmp_path, image_folder):
    bb = tmp_path / "backbone.pth"
    torch.save({"state_dict": _tiny_vit_state()}, bb)
    out = tmp_path / "out"
    common = ["--finetune", str(bb), "--model", "vit_tiny", "--input_size", "32", "--warmup_epochs", "1",
              "--layer_decay", "0.65", "--mixup", "0.8", "--cutmix", "1.0", "--layer_scale_init_value", "0.0",
              "--disable_rel_pos_bias", "--abs_pos_emb", "--use_cls", "--imagenet_default_mean_and_std",
              "--output_dir", str(out), "--data_path", str(image_folder), "--batch_size", "4", "--lr", "1e-3",
              "--model_key", "model|module", "--model_prefix", "", "--num_workers", "0", "--device", "cpu",
              "--drop_path", "0.1", "--print_freq", "100"]
    stats = run_class_finetuning.main(_parse(run_class_finetuning.get_args_parser, common + ["--epochs", "1"]))
    assert 0.0 <= stats["max_accuracy"] <= 100.0
    for name in ("checkpoint-0.pth", "checkpoint.pth", "log.txt"):
        assert (out / name).exists(), name
    assert _log_epochs(out) == [0]
    ckpt = safe_load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and {"model", "optimizer", "scaler", "args"} <= set(ckpt)
    assert ckpt["model"]["head.weight"].shape == (2, 192)

    run_class_finetuning.main(_parse(run_class_finetuning.get_args_parser,
                                     common + ["--epochs", "2", "--resume", str(out / "checkpoint.pth")]))
    assert _log_epochs(out) == [0, 1]
    assert safe_load(out / "checkpoint.pth")["epoch"] == 1
    assert (out / "checkpoint-1.pth").exists()
    # evaluation only
    res = run_class_finetuning.main(_parse(run_class_finetuning.get_args_parser,
                                           common + ["--eval", "--resume", str(out / "checkpoint-1.pth")]))
    assert "acc1" in res and "acc5" in res


def test_eval_cls_one_epoch_and_resume(tmp_path, image_folder):
    ckpt_path = tmp_path / "full.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in _tiny_vit_state().items()}, "epoch": 10}, ckpt_path)
    out = tmp_path / "out"
    common = ["--arch", "vit_tiny", "--patch_size", "16", "--input-size", "32", "--pretrained_weights",
              str(ckpt_path), "--checkpoint_key", "teacher", "--data_set", "folder", "--data_path",
              str(image_folder), "--batch-size", "4", "--lr", "5e-4", "--reprob", "0.25", "--output_dir", str(out),
              "--num_workers", "0", "--device", "cpu", "--print_freq", "100", "--warmup-epochs", "1"]
    res = eval_cls.main(_parse(eval_cls.get_args_parser, common + ["--epochs", "1"]))
    assert "teacher" in res
    path = out / "checkpoint_teacher_cls.pth"
    assert path.exists() and _log_epochs(out) == [0]
    ckpt = safe_load(path)
    assert ckpt["epoch"] == 0 and "model_ema" in ckpt and "backbone.pos_embed" in ckpt["model"]
    eval_cls.main(_parse(eval_cls.get_args_parser, common + ["--epochs", "2", "--resume", str(path)]))
    assert _log_epochs(out) == [0, 1]


def test_semi_supervised_head_layer(tmp_path, image_folder):
    torch.manual_seed(0)
    head = iBOTHead(192, 64, patch_out_dim=64, shared_head=True)
    sd = {"backbone." + k: v for k, v in _tiny_vit_state().items()}
    sd.update({"head." + k: v for k, v in head.state_dict().items()})
    ckpt_path = tmp_path / "full.pth"
    torch.save({"teacher": sd}, ckpt_path)

    args = _parse(semi_eval_cls.get_args_parser,
                  ["--arch", "vit_tiny", "--input_size", "32", "--pretrained_weights", str(ckpt_path),
                   "--finetune_head_layer", "3", "--out_dim", "64"])
    assert args.lr == 1e-3 and args.aa == "none" and args.teacher_model == "self"
    model = semi_eval_cls.build_model(args, 2, "teacher")
    msd = model.state_dict()
    for k in ("mlp.0.weight", "mlp.2.bias", "mlp.4.weight", "last_layer.weight_v", "last_layer.weight_g"):
        assert torch.equal(msd["head." + k], sd["head." + k]), k
    assert model.head.cls_head.in_features == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)

    out = tmp_path / "out"
    res = semi_eval_cls.main(_parse(semi_eval_cls.get_args_parser, [
        "--arch", "vit_tiny", "--input_size", "32", "--pretrained_weights", str(ckpt_path), "--checkpoint_key",
        "teacher", "--data_path", str(image_folder), "--data_set", "folder", "--batch-size", "4", "--epochs", "1",
        "--finetune_head_layer", "1", "--output_dir", str(out), "--num_workers", "0", "--device", "cpu",
        "--print_freq", "100"]))
    assert "teacher" in res and (out / "checkpoint_teacher_cls.pth").exists() and _log_epochs(out) == [0]
    saved = safe_load(out / "checkpoint_teacher_cls.pth")["model"]
    assert saved["head.mlp.0.weight"].shape == (2048, 192) and saved["head.cls_head.weight"].shape == (2, 2048)

    # a backbone-only file cannot initialise the projection head
    bb = tmp_path / "bb.pth"
    torch.save(_tiny_vit_state(), bb)
    args.pretrained_weights = str(bb)
    args.finetune_head_layer = 1
    with pytest.raises(RuntimeError, match="projection-head"):
        semi_eval_cls.build_model(args, 2, "teacher")


def test_eval_cls_dataset_builders(tmp_path):
    from scipy.io import savemat
    img = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    # Flowers-102: 1-based image ids and labels
    (tmp_path / "flw" / "jpg").mkdir(parents=True)
    for i in range(1, 7):
        img.save(tmp_path / "flw" / "jpg" / f"image_{i:05d}.jpg")
    savemat(tmp_path / "flw" / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 102, 2, 1]])})
    savemat(tmp_path / "flw" / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]),
                                             "tstid": np.array([[4, 5, 6]])})
    args = _parse(eval_cls.get_args_parser, ["--data_set", "Flwrs", "--data_path", str(tmp_path / "flw"),
                                             "--input_size", "32"])
    train, n = eval_cls.build_dataset(True, args)
    test, _ = eval_cls.build_dataset(False, args)
    assert n == 102 and len(train) == 3 and len(test) == 3
    assert [t for _, t in test.samples] == [101, 1, 0]
    assert train[0][0].shape == (3, 32, 32)
    # Stanford Cars: 196 classes, label = class - 1, split by the test flag
    (tmp_path / "cars" / "car_ims").mkdir(parents=True)
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
             ("class", "O"), ("test", "O")]
    rows = []
    for i, (cls, test_flag) in enumerate([(1, 0), (196, 0), (5, 1)]):
        img.save(tmp_path / "cars" / "car_ims" / f"{i:06d}.jpg")
        rows.append((f"car_ims/{i:06d}.jpg", 1, 2, 300, 400, cls, test_flag))
    savemat(tmp_path / "cars" / "cars_annos.mat", {"annotations": np.array([rows], dtype=dtype)})
    args.data_set, args.data_path = "Cars", str(tmp_path / "cars")
    train, n = eval_cls.build_dataset(True, args)
    test, _ = eval_cls.build_dataset(False, args)
    assert n == 196 and [t for _, t in train.samples] == [0, 195] and [t for _, t in test.samples] == [4]
    assert test[0][0].shape == (3, 32, 32)
    # iNat 2018: labels in order of first appearance in the train annotations
    root = tmp_path / "inat"
    cats = [{"name": f"sp{i}", "supercategory": "Plantae"} for i in range(4)]
    images = {"train": [(3, "a.jpg"), (1, "b.jpg")], "val": [(1, "c.jpg")]}
    for split, items in images.items():
        for cat, fname in items:
            (root / "train_val2018" / "Plantae" / str(cat)).mkdir(parents=True, exist_ok=True)
            img.save(root / "train_val2018" / "Plantae" / str(cat) / fname)
        data = {"images": [{"file_name": f"train_val2018/Plantae/{c}/{f}", "id": i} for i, (c, f) in enumerate(items)],
                "annotations": [{"category_id": c, "image_id": i} for i, (c, _) in enumerate(items)]}
        (root / f"{split}2018.json").write_text(json.dumps(data))
    (root / "categories.json").write_text(json.dumps(cats))
    args.data_set, args.data_path = "INAT", str(root)
    train, n = eval_cls.build_dataset(True, args)
    test, _ = eval_cls.build_dataset(False, args)
    assert n == 2 and [t for _, t in train.samples] == [0, 1] and [t for _, t in test.samples] == [1]
    assert test[0][0].shape == (3, 32, 32)
