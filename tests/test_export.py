"""Backbone extraction (official formats) and timm export."""
import json

import pytest
import torch

from ibot.utils.checkpoint import safe_load
from ibot.eval.export import ExportError, export_timm, timm_config, to_timm_state_dict
from official_fixtures import FIXTURES
from repo_files import load_repo_file

OFFICIAL = str(FIXTURES / "official_checkpoint.pth")


def _module(rel):
    return load_repo_file(rel)


def _run(rel, argv):
    mod = _module(rel)
    return mod.main(mod.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("key,prefix", [("teacher", "backbone."), ("student", "module.backbone.")])
def test_official_extract_formats(tmp_path, key, prefix):
    entry = safe_load(OFFICIAL)[key]
    out = tmp_path / "bb.pth"
    _run("extract_backbone_weights.py", [OFFICIAL, str(out), "--checkpoint_key", key])
    saved = safe_load(out)
    assert list(saved) == ["state_dict"]
    expected = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
    assert saved["state_dict"].keys() == expected.keys()
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in expected.items())
    # --with_head keeps the other entries with unchanged keys
    _run("extract_backbone_weights.py", [OFFICIAL, str(out), "--checkpoint_key", key, "--with_head", "true"])
    head_key = ("module." if key == "student" else "") + "head.mlp.0.weight"
    assert head_key in safe_load(out)["state_dict"]
    # flat format
    flat = tmp_path / "flat.pth"
    _run("evaluation/classification_layer_decay/extract_backbone_weights.py",
         [OFFICIAL, str(flat), "--checkpoint_key", key])
    assert safe_load(flat).keys() == expected.keys()


def test_extract_errors(tmp_path):
    with pytest.raises(ExportError, match=r"'state_dict' not found.*'teacher'"):
        _run("extract_backbone_weights.py", [OFFICIAL, str(tmp_path / "a.pth")])  # default key state_dict
    with pytest.raises(ExportError, match="no backbone keys"):
        _run("extract_backbone_weights.py", [OFFICIAL, str(tmp_path / "a.pth"), "--checkpoint_key", "ibot_loss"])
    with pytest.raises(ExportError, match="no backbone keys"):
        _run("evaluation/classification_layer_decay/extract_backbone_weights.py",
             [OFFICIAL, str(tmp_path / "a.pth"), "--checkpoint_key", "ibot_loss"])
    assert not (tmp_path / "a.pth").exists()


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_timm_export_round_trip(tmp_path, key):
    from ibot.eval.weights import load_pretrained_weights
    from ibot.models.vision_transformer import VisionTransformer
    from ibot.eval.export import create_timm_model

    out = tmp_path / "timm.pth"
    _run("extract_backbone_weights.py", [OFFICIAL, str(out), "--checkpoint_key", key, "--format", "timm",
                                         "--num_heads", "3"])
    config = json.load(open(str(out) + ".timm.json"))
    assert config["kwargs"]["img_size"] == 32 and config["kwargs"]["patch_size"] == 8
    timm_model = create_timm_model(config).eval()
    timm_model.load_state_dict(safe_load(out), strict=True)
    ours = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True).eval()
    load_pretrained_weights(ours, OFFICIAL, key)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), ours(x), atol=1e-5, rtol=1e-5)
    # non-standard width without --num_heads: clear error
    with pytest.raises(ExportError, match="num_heads"):
        export_timm(OFFICIAL, key)


def test_timm_standard_name_strict_load():
    """A standard vit_tiny/16 backbone maps to timm's registry name and loads strictly."""
    from ibot.models.vision_transformer import vit_tiny
    import timm
    ours = vit_tiny(patch_size=16, masked_im_modeling=True).eval()
    sd = {"module.backbone." + k: v for k, v in ours.state_dict().items()}
    sd["module.head.mlp.0.weight"] = torch.zeros(2, 2)
    timm_sd, config = to_timm_state_dict(sd)
    assert config == {"model_name": "vit_tiny_patch16_224",
                      "kwargs": {"img_size": 224, "patch_size": 16, "num_classes": 0}}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    model.load_state_dict(timm_sd, strict=True)
    ours.masked_im_modeling = False
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-4, rtol=1e-4)


def test_timm_export_rejects_non_vit():
    with pytest.raises(ExportError, match="no backbone keys"):
        timm_config({"head.mlp.0.weight": torch.zeros(1)})
    with pytest.raises(ExportError, match="Swin"):
        timm_config({"layers.0.blocks.0.norm1.weight": torch.zeros(1)})
