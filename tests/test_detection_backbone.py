"""Detection: the non-square ViT backbone (800 x 1008 from a 224-px checkpoint), the detector's layer
decay groups, and a clear error for a backbone file that does not fit the architecture."""
import pytest
import torch
import torch.nn.functional as F

from ibot.dense import DenseViT
from ibot.eval.weights import PretrainedWeightsError
from ibot.models import create_model


@pytest.fixture(scope="module")
def vit224_file(tmp_path_factory):
    torch.manual_seed(0)
    vit = create_model("vit_tiny", patch_size=16, img_size=[224])
    path = tmp_path_factory.mktemp("det_backbone") / "backbone.pth"
    torch.save({"state_dict": vit.state_dict()}, path)
    return str(path), vit


def test_non_square_backbone_from_224_checkpoint(vit224_file):
    path, vit = vit224_file
    net = DenseViT("vit_tiny", patch_size=16, img_size=(800, 1008))
    report = net.load_pretrained(path, "state_dict")
    assert report["resized"] == ["pos_embed"]
    assert net.pos_embed.shape == (1, 1 + 50 * 63, 192)
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(50, 63), mode="bicubic", align_corners=False)
    torch.testing.assert_close(net.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, -1, 192))
    torch.testing.assert_close(net.pos_embed[:, :1], vit.pos_embed[:, :1])
    net.eval()
    with torch.no_grad():
        for h, w in ((800, 1008), (224, 224), (320, 480)):   # the nominal grid, square, other
            maps = net(torch.randn(1, 3, h, w))
            assert [tuple(m.shape[2:]) for m in maps] == [(h // s, w // s) for s in (4, 8, 16, 32)]
            assert all(m.shape[1] == 192 for m in maps)


def test_unresized_backbone_gives_the_vit_features_at_224(vit224_file):
    path, vit = vit224_file
    net = DenseViT("vit_tiny", patch_size=16, img_size=224, with_fpn=False)
    assert net.load_pretrained(path, "state_dict")["resized"] == []
    net.eval()
    vit.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        taps = net(x)
        tokens = vit.prepare_tokens(x)
        expected = []
        for i, blk in enumerate(vit.blocks):
            tokens = blk(tokens)
            if i in (3, 5, 7, 11):
                expected.append(tokens[:, 1:].transpose(1, 2).reshape(2, 192, 14, 14))
    for got, want in zip(taps, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backbone_file_of_another_architecture_is_refused(vit224_file):
    path, _ = vit224_file
    net = DenseViT("vit_small", patch_size=16, img_size=(64, 64))
    with pytest.raises(PretrainedWeightsError, match="does not match"):
        net.load_pretrained(path, "state_dict")


def test_detector_layer_decay_groups():
    from ibot.dense.layer_decay import layer_decay_param_groups
    from ibot.detection.model import build_detector
    from ibot.detection.presets import get_config
    model = build_detector(get_config("fmnist_tiny"), num_classes=3)
    groups = {n: g for g in layer_decay_param_groups(model, 1e-4, 0.05, 0.75) for n in g["param_names"]}
    assert groups["backbone.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75 ** 12)
    assert groups["backbone.blocks.11.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75 ** 1)
    assert groups["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** 13)
    for name in ("neck.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight", "roi_heads.box_heads.2.fc_cls.weight",
                 "roi_heads.mask_heads.0.conv_logits.weight", "backbone.fpn1.0.weight"):
        assert groups[name]["lr_scale"] == 1.0 and groups[name]["weight_decay"] == 0.05
    assert groups["roi_heads.box_heads.0.fc_cls.bias"]["weight_decay"] == 0.0
    assert groups["backbone.pos_embed"]["weight_decay"] == 0.05          # official quirk: decayed
    assert len(model.roi_heads.box_heads) == 3 and len(model.roi_heads.mask_heads) == 3
    assert len(build_detector(get_config("fmnist_tiny", detector="mask_rcnn"), 3).roi_heads.box_heads) == 1
