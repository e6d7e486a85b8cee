"""ibot.dense: the dense ViT backbone (taps, pyramid, freezing, position embedding) and the official
layer-decay parameter groups (evaluation.md §2.12-2.13)."""
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from ibot.dense import DenseViT, layer_decay_param_groups, plain_param_groups
from ibot.eval.weights import PretrainedWeightsError
from ibot.models import create_model, register_model, unregister_model
from ibot.models.vision_transformer import VisionTransformer

TINY2 = "vit_dense_test_2blocks"


@pytest.fixture(autouse=True)
def tiny_arch():
    """A 2-block, 48-dim ViT registered for the duration of each test; one torch thread."""
    register_model(partial(VisionTransformer, embed_dim=48, depth=2, num_heads=3, qkv_bias=True,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6)), name=TINY2, family="vit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    unregister_model(TINY2)


class Segmentor(nn.Module):
    """The attribute layout of the official segmentors: backbone, decode_head, auxiliary_head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.decode_head = nn.Sequential(nn.Conv2d(4 * dim, 8, 1), nn.BatchNorm2d(8))
        self.auxiliary_head = nn.Conv2d(dim, 8, 1)


def _expected_layer_id(name, blocks):
    bare = name[len("backbone."):] if name.startswith("backbone.") else None
    if bare is None:
        return blocks + 1
    if bare in ("cls_token", "pos_embed", "mask_token") or bare.startswith("patch_embed."):
        return 0
    if bare.startswith("blocks."):
        return int(bare.split(".")[1]) + 1
    return blocks + 1


def _group_of(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_layer_decay_groups_vit_small():
    model = Segmentor(DenseViT("vit_small", patch_size=16, img_size=512, out_with_norm=True))
    rate, lr = 0.9, 3e-5
    groups = layer_decay_param_groups(model, lr, weight_decay=0.05, layer_decay_rate=rate)
    by_name = _group_of(groups)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(by_name) == sorted(names)
    ids = {n: int(by_name[n]["group_name"].split("_")[1]) for n in names}
    assert sorted(set(ids.values())) == list(range(14))  # 12 blocks + embeddings + the rest
    for name, param in model.named_parameters():
        g = by_name[name]
        assert ids[name] == _expected_layer_id(name, 12), name
        assert g["lr_scale"] == pytest.approx(rate ** (13 - ids[name]))
        assert g["lr"] == pytest.approx(lr * rate ** (13 - ids[name]))
        no_decay = param.ndim == 1 or name.endswith(".bias")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    # the quirk: pos_embed / cls_token are decayed; embeddings get r^13, block 0 r^12, heads 1
    assert by_name["backbone.pos_embed"]["group_name"] == "layer_0_decay"
    assert by_name["backbone.cls_token"]["group_name"] == "layer_0_decay"
    assert by_name["backbone.patch_embed.proj.bias"]["group_name"] == "layer_0_no_decay"
    assert by_name["backbone.blocks.11.mlp.fc2.weight"]["lr_scale"] == pytest.approx(0.9)
    assert by_name["backbone.fpn1.1.weight"]["group_name"] == "layer_13_no_decay"     # pyramid BN
    assert by_name["backbone.norm.weight"]["group_name"] == "layer_13_no_decay"
    assert by_name["decode_head.0.weight"]["group_name"] == "layer_13_decay"
    assert by_name["decode_head.0.weight"]["lr_scale"] == 1.0
    exempt = _group_of(layer_decay_param_groups(model, lr, 0.05, rate, exempt_pos_embed=True))
    assert exempt["backbone.pos_embed"]["weight_decay"] == 0.0
    assert exempt["backbone.cls_token"]["group_name"] == "layer_0_no_decay"


def test_layer_decay_groups_two_block_vit_by_hand():
    model = Segmentor(DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1)))
    groups = layer_decay_param_groups(model, 1.0, weight_decay=0.1, layer_decay_rate=0.5)
    block = lambda b, kinds: [f"backbone.blocks.{b}.{k}" for k in kinds]  # noqa: E731
    nd = ["norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
          "mlp.fc1.bias", "mlp.fc2.bias"]
    d = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    expected = {
        "layer_0_decay": (0.125, 0.1, ["backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight"]),
        "layer_0_no_decay": (0.125, 0.0, ["backbone.patch_embed.proj.bias"]),
        "layer_1_no_decay": (0.25, 0.0, block(0, nd)), "layer_1_decay": (0.25, 0.1, block(0, d)),
        "layer_2_no_decay": (0.5, 0.0, block(1, nd)), "layer_2_decay": (0.5, 0.1, block(1, d)),
        # patch 8: the only parameterised pyramid operator is fpn1 (one ConvT)
        "layer_3_decay": (1.0, 0.1, ["backbone.fpn1.0.weight", "decode_head.0.weight", "auxiliary_head.weight"]),
        "layer_3_no_decay": (1.0, 0.0, ["backbone.fpn1.0.bias", "decode_head.0.bias", "decode_head.1.weight",
                                        "decode_head.1.bias", "auxiliary_head.bias"]),
    }
    got = {g["group_name"]: (g["lr_scale"], g["weight_decay"], sorted(g["param_names"])) for g in groups}
    assert got == {k: (s, w, sorted(n)) for k, (s, w, n) in expected.items()}
    assert all(g["lr"] == g["lr_scale"] for g in groups)
    opt = torch.optim.AdamW(groups, lr=1.0)  # torch accepts the extra keys
    assert len(opt.param_groups) == 8


def test_plain_groups_linear_protocol():
    backbone = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1), with_fpn=False,
                        frozen_stages=2, out_with_norm=True)
    model = nn.Module()
    model.backbone, model.conv_seg = backbone, nn.Conv2d(4 * 48, 5, 1)
    (group,) = plain_param_groups(model, 8e-4, 0.05)
    assert group["param_names"] == ["conv_seg.weight", "conv_seg.bias"]  # biases decayed too
    assert group["weight_decay"] == 0.05 and group["lr"] == 8e-4


@pytest.mark.parametrize("patch", [16, 8])
def test_pyramid_strides_and_shapes(patch):
    model = DenseViT("vit_tiny", patch_size=patch, img_size=64).eval()
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 64, 96))
    assert model.out_strides == (4, 8, 16, 32)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    kinds = [type(m).__name__ for m in (model.fpn1, model.fpn2, model.fpn3, model.fpn4)]
    assert kinds == ["Sequential", "Sequential", "Identity", "MaxPool2d"] if patch == 16 else \
        ["Sequential", "Identity", "Sequential", "Sequential"]
    if patch == 16:
        assert [type(m).__name__ for m in model.fpn1] == ["ConvTranspose2d", "BatchNorm2d", "GELU",
                                                         "ConvTranspose2d"]


def _checkpoint_of(vit, path):
    torch.save({"teacher": {"backbone." + k: v for k, v in vit.state_dict().items()}}, path)


def test_taps_are_the_vit_blocks(tmp_path):
    torch.manual_seed(0)
    vit = create_model(TINY2, patch_size=8, img_size=[32]).eval()
    _checkpoint_of(vit, tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 32, 48)
    for with_norm in (True, False):
        dense = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 0, 1), with_fpn=False,
                         out_with_norm=with_norm).eval()
        report = dense.load_pretrained(str(tmp_path / "ckpt.pth"), "teacher")
        assert not report["missing"] and not report["unexpected"]
        assert ("norm.weight" in dense.state_dict()) == with_norm
        with torch.no_grad():
            maps = dense(x)
            tokens = vit.prepare_tokens(x)
            per_block = []
            for blk in vit.blocks:
                tokens = blk(tokens)
                per_block.append(vit.norm(tokens) if with_norm else tokens)
        for m, b in zip(maps, (0, 1, 0, 1)):
            ref = per_block[b][:, 1:].reshape(2, 4, 6, 48).permute(0, 3, 1, 2)  # row-major patch grid
            torch.testing.assert_close(m, ref, atol=1e-5, rtol=0)


def test_frozen_stages_and_train_mode():
    dense = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1), frozen_stages=0,
                     drop_path_rate=0.5, with_fpn=False, out_with_norm=True)
    frozen = {n for n, p in dense.named_parameters() if not p.requires_grad}
    assert frozen == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    dense = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1), frozen_stages=1,
                     drop_path_rate=0.5, with_fpn=False, out_with_norm=True)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in dense.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1", "norm.weight", "norm.bias"}
    full = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1), frozen_stages=2,
                    drop_path_rate=0.5, with_fpn=False, out_with_norm=True).train()
    assert not any(p.requires_grad for p in full.parameters())
    assert not any(m.training for m in full.blocks) and not full.norm.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # frozen blocks stay in eval mode under train(): drop path is off
        torch.testing.assert_close(full(x)[1], full(x)[1], atol=0, rtol=0)
    with pytest.raises(ValueError, match="frozen_stages"):
        DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1), frozen_stages=3)


def test_activation_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    plain = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1)).train()
    ckpt = DenseViT(TINY2, patch_size=8, img_size=32, out_indices=(0, 1, 1, 1), use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, ckpt):
        sum(m.square().mean() for m in model(x)).backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def _bicubic_resize_reference(table, new_h, new_w):
    """Bicubic resize of a (S, S, D) table to (new_h, new_w, D) written out: Keys kernel a=-0.75,
    half-pixel centres (align_corners=False), border indices clamped."""
    a, old = -0.75, table.shape[0]

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    def weights(i, new):
        src = (i + 0.5) * old / new - 0.5
        base = int(np.floor(src))
        return [(min(max(base + k, 0), old - 1), kernel(src - (base + k))) for k in (-1, 0, 1, 2)]

    out = np.zeros((new_h, new_w, table.shape[2]))
    for y in range(new_h):
        for x in range(new_w):
            for iy, wy in weights(y, new_h):
                for ix, wx in weights(x, new_w):
                    out[y, x] += wy * wx * table[iy, ix]
    return out


def test_pos_embed_resized_when_loading_224_checkpoint_for_512_crops(tmp_path):
    torch.manual_seed(0)
    vit = create_model(TINY2, patch_size=16, img_size=[224]).eval()
    _checkpoint_of(vit, tmp_path / "ckpt224.pth")
    x = torch.randn(1, 3, 224, 224)
    # the same checkpoint at its own grid: features identical to the ViT's
    native = DenseViT(TINY2, patch_size=16, img_size=224, out_indices=(0, 1, 1, 1), with_fpn=False).eval()
    native.load_pretrained(str(tmp_path / "ckpt224.pth"))
    with torch.no_grad():
        ref = vit.blocks[1](vit.blocks[0](vit.prepare_tokens(x)))[:, 1:]
        torch.testing.assert_close(native(x)[1].flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=0)
    # for 512-px crops: a 32x32 grid, the bicubic resize of the 14x14 table, CLS entry unchanged
    dense = DenseViT(TINY2, patch_size=16, img_size=512, out_indices=(0, 1, 1, 1), with_fpn=False).eval()
    report = dense.load_pretrained(str(tmp_path / "ckpt224.pth"))
    assert report["resized"] == ["pos_embed"]
    assert dense.pos_embed.shape == (1, 32 * 32 + 1, 48) and dense.grid_size == (32, 32)
    assert torch.equal(dense.pos_embed[:, 0], vit.pos_embed[:, 0])
    expected = _bicubic_resize_reference(vit.pos_embed[0, 1:].detach().reshape(14, 14, 48).double().numpy(), 32, 32)
    np.testing.assert_allclose(dense.pos_embed[0, 1:].detach().reshape(32, 32, 48).numpy(), expected, atol=1e-5)
    # a 224-px input to the 512 model: the table is resized at run time by the ViT's own (+0.1) rule
    with torch.no_grad():
        expected_pe = vit.__class__.interpolate_pos_encoding(dense, torch.zeros(1, 197, 48), 224, 224)
        torch.testing.assert_close(dense.position_embedding(14, 14), expected_pe, atol=0, rtol=0)
        assert dense(x)[0].shape == (1, 48, 14, 14)


def test_non_square_img_size_loading(tmp_path):
    torch.manual_seed(0)
    vit = create_model(TINY2, patch_size=16, img_size=[224])
    _checkpoint_of(vit, tmp_path / "ckpt224.pth")
    dense = DenseViT(TINY2, patch_size=16, img_size=(80, 112), out_indices=(0, 1, 1, 1))
    assert dense.load_pretrained(str(tmp_path / "ckpt224.pth"))["resized"] == ["pos_embed"]
    expected = _bicubic_resize_reference(vit.pos_embed[0, 1:].detach().reshape(14, 14, 48).double().numpy(), 5, 7)
    np.testing.assert_allclose(dense.pos_embed[0, 1:].detach().reshape(5, 7, 48).numpy(), expected, atol=1e-5)


def test_non_square_img_size_and_runtime_grid():
    dense = DenseViT(TINY2, patch_size=8, img_size=(32, 48), out_indices=(0, 1, 1, 1)).eval()
    assert dense.pos_embed.shape == (1, 4 * 6 + 1, 48) and dense.grid_size == (4, 6)
    assert dense.position_embedding(4, 6) is dense.pos_embed
    pe = dense.position_embedding(8, 5)
    assert pe.shape == (1, 41, 48) and torch.equal(pe[:, 0], dense.pos_embed[:, 0])
    with torch.no_grad():
        assert [tuple(m.shape[-2:]) for m in dense(torch.randn(1, 3, 64, 40))] == [(16, 10), (8, 5), (4, 2), (2, 1)]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        DenseViT("vit_tiny", patch_size=16, img_size=520)
    with pytest.raises(ValueError, match="patch sizes 8 and 16"):
        DenseViT("vit_tiny", patch_size=14, img_size=224)
    with pytest.raises(ValueError, match="not one"):
        DenseViT("swin_tiny", patch_size=16, img_size=224)
    _checkpoint_of(create_model(TINY2, patch_size=8, img_size=[32]), tmp_path / "tiny.pth")
    dense = DenseViT("vit_tiny", patch_size=8, img_size=32)
    with pytest.raises(PretrainedWeightsError, match="blocks.11"):  # the list of keys that do not fit
        dense.load_pretrained(str(tmp_path / "tiny.pth"))
