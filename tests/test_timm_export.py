"""``extract_backbone_weights.py --format timm`` for every ViT the repository builds.

Each backbone (random weights) goes through the exporter script; the JSON beside the export names a
timm model that ``timm.create_model`` builds, the state dict loads into it strictly, and the timm
model's features equal ours (atol 1e-5) on a few images.
"""
import json

import pytest
import timm
import torch

from ibot.models import create_model
from ibot.eval.export import timm_config, to_timm_state_dict
from ibot.utils.checkpoint import atomic_save, safe_load
from repo_files import load_repo_file


def _exporter():
    return load_repo_file("extract_backbone_weights.py")


def _export_and_compare(tmp_path, ours, img, capsys, n_images=2, key="teacher"):
    """Save ``ours`` as an iBOT checkpoint entry, export it with the script, rebuild from the JSON."""
    ours.eval()
    ckpt = {key: {"backbone." + k: v for k, v in ours.state_dict().items()}}
    ckpt[key]["head.last_layer.weight_g"] = torch.ones(8, 1)  # head keys must be dropped
    src, out = tmp_path / "checkpoint.pth", tmp_path / "timm.pth"
    atomic_save(ckpt, src)
    mod = _exporter()
    mod.main(mod.get_args_parser().parse_args([str(src), str(out), "--checkpoint_key", key,
                                               "--format", "timm"]))
    config = json.load(open(str(out) + ".timm.json"))
    printed = capsys.readouterr().out
    assert repr(config["model_name"]) in printed and "strict=True" in printed
    assert timm.is_model(config["model_name"]), config
    kwargs = config["kwargs"]
    assert (kwargs["img_size"], kwargs["num_classes"]) == (img, 0)
    model = timm.create_model(config["model_name"], pretrained=False, **kwargs).eval()
    model.load_state_dict(safe_load(out), strict=True)
    x = torch.randn(n_images, 3, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=0)
    return config


@pytest.mark.parametrize("img", [32, 224])
@pytest.mark.parametrize("arch,patch,expected_name", [
    ("vit_tiny", 8, "vit_tiny_patch16_224"),    # timm has no vit_tiny_patch8: patch_size kwarg
    ("vit_tiny", 4, "vit_tiny_patch16_224"),
    ("vit_small", 16, "vit_small_patch16_224"),
    ("vit_small", 8, "vit_small_patch8_224"),
])
def test_timm_export_every_patch_and_size(tmp_path, capsys, arch, patch, img, expected_name):
    torch.manual_seed(0)
    ours = create_model(arch, patch_size=patch, img_size=img)
    config = _export_and_compare(tmp_path, ours, img, capsys, n_images=1 if img == 224 else 3)
    assert config == {"model_name": expected_name,
                      "kwargs": {"img_size": img, "patch_size": patch, "num_classes": 0}}


def test_timm_export_depth_width_layerscale_meanpool(tmp_path, capsys):
    """Non-standard depth (size name kept, depth kwarg), non-standard width (generic name with every
    size kwarg), no qkv bias, LayerScale and mean pooling all rebuild and match."""
    from ibot.models.vision_transformer import VisionTransformer
    torch.manual_seed(1)
    shallow = VisionTransformer(img_size=32, patch_size=8, embed_dim=384, depth=3, num_heads=6, qkv_bias=True)
    config = _export_and_compare(tmp_path, shallow, 32, capsys)
    assert config == {"model_name": "vit_small_patch8_224",
                      "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 0, "depth": 3}}

    odd = VisionTransformer(img_size=48, patch_size=6, embed_dim=96, depth=2, num_heads=4, mlp_ratio=2,
                            qkv_bias=False, init_values=0.1, use_mean_pooling=True)
    for blk in odd.blocks:  # LayerScale away from its init value, so a lost gamma would show
        torch.nn.init.uniform_(blk.gamma_1, 0.5, 1.5)
        torch.nn.init.uniform_(blk.gamma_2, 0.5, 1.5)
    with pytest.raises(Exception, match="num_heads"):
        timm_config(odd.state_dict())
    sd, config = to_timm_state_dict(odd.state_dict(), timm_config(odd.state_dict(), num_heads=4))
    assert config["model_name"] == "vit_base_patch16_224"
    assert config["kwargs"] == {"img_size": 48, "patch_size": 6, "num_classes": 0, "embed_dim": 96,
                                "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "qkv_bias": False,
                                "init_values": 1.0, "global_pool": "avg", "fc_norm": True}
    assert "blocks.1.ls2.gamma" in sd and not any("gamma_" in k for k in sd)
    model = timm.create_model(config["model_name"], pretrained=False, **config["kwargs"]).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), odd.eval()(x), atol=1e-5, rtol=0)
