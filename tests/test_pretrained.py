"""ibot.pretrained.load_pretrained_weights: official checkpoints, backbone files, errors, safety."""
import logging
import os
import pickle

import pytest
import torch

from ibot.utils.checkpoint import UnsafeCheckpointError
from ibot.eval.weights import (PretrainedWeightsError, backbone_state_dict, load_pretrained_weights,
                             strip_prefixes)
from official_fixtures import FIXTURES

FIX = str(FIXTURES)
OFFICIAL = os.path.join(FIX, "official_checkpoint.pth")


def tiny_vit(**kw):
    from ibot.models.vision_transformer import VisionTransformer
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True)
    args.update(kw)
    return VisionTransformer(**args).eval()


def _official():
    from ibot.utils.checkpoint import safe_load
    return safe_load(OFFICIAL)


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_official_checkpoint_loads(key):
    model = tiny_vit()
    report = load_pretrained_weights(model, OFFICIAL, key, "vit_tiny", 8)
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    ref = {k.split("backbone.", 1)[1]: v for k, v in _official()[key].items() if "backbone." in k}
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name]), name
    if key == "student":
        assert "masked_embed" in report["dropped"]


def test_official_teacher_features():
    model = tiny_vit()
    load_pretrained_weights(model, OFFICIAL, "teacher", "vit_tiny", 8)
    fx = torch.load(os.path.join(FIX, "official_checkpoint_features.pt"), weights_only=True)
    out_key = [k for k in fx if k != "x"][0]
    with torch.no_grad():
        out = model(fx["x"], return_all_tokens=True)
    torch.testing.assert_close(out, fx[out_key], atol=1e-5, rtol=0)


def test_student_with_masked_embed_model():
    model = tiny_vit(masked_im_modeling=True)
    report = load_pretrained_weights(model, OFFICIAL, "student")
    assert torch.equal(model.masked_embed, _official()["student"]["module.backbone.masked_embed"])
    assert not report["missing"]
    # a teacher has no masked_embed: the model keeps its own (zeros), not an error
    model = tiny_vit(masked_im_modeling=True)
    load_pretrained_weights(model, OFFICIAL, "teacher")
    assert torch.count_nonzero(model.masked_embed) == 0


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "module"])
def test_backbone_file_formats(tmp_path, wrapper):
    teacher = _official()["teacher"]
    flat = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    flat["head.mlp.0.weight"] = teacher["head.mlp.0.weight"]  # --with_head files keep head keys
    obj = flat if wrapper is None else {wrapper: {"module." + k: v for k, v in flat.items()}}
    path = tmp_path / "backbone.pth"
    torch.save(obj, path)
    for key in ("teacher", None, wrapper or "teacher"):  # teacher given for a backbone file: auto-detected
        model = tiny_vit()
        report = load_pretrained_weights(model, str(path), key)
        assert "head.mlp.0.weight" in report["dropped"]
        assert torch.equal(model.pos_embed, flat["pos_embed"])


def test_prefix_stripping_only_at_start():
    sd = {"module.backbone.blocks.0.module.w": torch.zeros(1), "backbone.xbackbone.y": torch.zeros(1),
          "_orig_mod.module.norm.weight": torch.zeros(1)}
    out = strip_prefixes(sd)
    assert set(out) == {"blocks.0.module.w", "xbackbone.y", "norm.weight"}
    bb, dropped = backbone_state_dict({"module.backbone.a.backbone.b": torch.zeros(1),
                                       "module.head.mlp.0.weight": torch.zeros(1)})
    assert list(bb) == ["a.backbone.b"] and dropped == ["head.mlp.0.weight"]


def test_pos_embed_interpolated_for_other_grid():
    model = tiny_vit(img_size=64)  # 8x8 grid, checkpoint has 4x4
    report = load_pretrained_weights(model, OFFICIAL, "teacher")
    assert report["resized"] == ["pos_embed"] and model.pos_embed.shape == (1, 65, 48)
    teacher = _official()["teacher"]
    assert torch.equal(model.pos_embed[:, 0], teacher["backbone.pos_embed"][:, 0])


def test_mean_pooling_model_drops_norm():
    model = tiny_vit(use_mean_pooling=True)
    report = load_pretrained_weights(model, OFFICIAL, "teacher")
    assert "norm.weight" in report["dropped"] and not report["missing"]


def test_other_architecture_fails_with_names():
    model = tiny_vit(embed_dim=96, depth=3)
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained_weights(model, OFFICIAL, "teacher", "vit_x", 8)
    msg = str(err.value)
    assert "blocks.2.norm1.weight" in msg and "shape mismatches" in msg
    assert "cls_token (1, 1, 48) vs (1, 1, 96)" in msg
    # allow_partial loads what fits and reports the rest
    model = tiny_vit(depth=3)
    report = load_pretrained_weights(model, OFFICIAL, "teacher", allow_partial=True)
    assert "blocks.2.norm1.weight" in report["missing"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, _official()["teacher"]["backbone.blocks.0.attn.qkv.weight"])


def test_unknown_checkpoint_key_lists_keys():
    with pytest.raises(PretrainedWeightsError, match=r"'nope' not found.*'student', 'teacher'"):
        load_pretrained_weights(tiny_vit(), OFFICIAL, "nope")


def test_missing_file_and_download_keyword(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained_weights(tiny_vit(), str(tmp_path / "missing.pth"), "teacher")
    with pytest.raises(PretrainedWeightsError, match="never downloads"):
        load_pretrained_weights(tiny_vit(), "download", "teacher")


def test_empty_path_random_init_is_logged(caplog):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="ibot.eval.weights"):
        report = load_pretrained_weights(model, "", "teacher", "vit_tiny", 8)
    assert report == {"random_init": True}
    assert any("RANDOM initialisation" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": _Evil(str(marker))}}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained_weights(tiny_vit(), str(path), "teacher")
    assert not marker.exists()
    # also a raw pickle (not a torch zip file)
    raw = tmp_path / "evil.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"teacher": _Evil(str(marker))}, f)
    with pytest.raises((UnsafeCheckpointError, RuntimeError, pickle.UnpicklingError)):
        load_pretrained_weights(tiny_vit(), str(raw), "teacher")
    assert not marker.exists()
