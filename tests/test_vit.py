"""Tests of models/vision_transformer.py against the official fixtures and spec section 2."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn

from ibot.utils.checkpoint import safe_load
from ibot.models.vision_transformer import VisionTransformer, vit_base, vit_small, vit_tiny, vit_large
from official_fixtures import FIXTURES

FIX = FIXTURES


def _small(masked=True, **kw):
    """The fixture config: img 32, patch 8, dim 48, depth 2, 3 heads, qkv bias, eps 1e-6."""
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             masked_im_modeling=masked, **kw)


@pytest.fixture(scope="module")
def vit_fix():
    return torch.load(FIX / "vit_small_config.pt", weights_only=True)


# ---------------------------------------------------------------- official numbers
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_fixture_outputs(vit_fix, fused):
    c = vit_fix["config"]
    m = VisionTransformer(img_size=c["img_size"], patch_size=c["patch_size"],
                          embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                          mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"],
                          norm_layer=partial(nn.LayerNorm, eps=c["norm_eps"]),
                          masked_im_modeling=c["masked_im_modeling"])
    m.load_state_dict(vit_fix["state_dict"], strict=True)
    m.eval().set_fused_attn(fused)
    x, mask = vit_fix["x"], vit_fix["mask"]
    kw = dict(atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(m(x, return_all_tokens=True, mask=mask), vit_fix["out_masked"], **kw)
        m.masked_im_modeling = False
        torch.testing.assert_close(m(x, return_all_tokens=True), vit_fix["out_plain"], **kw)
        # the mask is ignored when the flag is off
        torch.testing.assert_close(m(x, return_all_tokens=True, mask=mask), vit_fix["out_plain"], **kw)
        torch.testing.assert_close(m(vit_fix["x_big"], return_all_tokens=True), vit_fix["out_big"], **kw)
        m.masked_im_modeling = True
        torch.testing.assert_close(m.get_last_selfattention(x), vit_fix["last_selfattention"], **kw)
        inter = m.get_intermediate_layers(x, n=2)
        assert len(inter) == 2
        for a, b in zip(inter, vit_fix["intermediate_layers"]):
            torch.testing.assert_close(a, b, **kw)
        # CLS-only output is token 0 of the all-token output
        torch.testing.assert_close(m(x, mask=mask), vit_fix["out_masked"][:, 0], **kw)


def test_state_dict_round_trip_names(vit_fix):
    m = _small()
    assert list(m.state_dict().keys()) == list(vit_fix["state_dict"].keys())
    assert [n for n, _ in m.named_parameters()] == list(vit_fix["state_dict"].keys())
    m.load_state_dict(vit_fix["state_dict"], strict=True)
    m2 = _small()
    m2.load_state_dict(m.state_dict(), strict=True)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, vit_fix["state_dict"][k]), k


def test_official_checkpoint_teacher_and_student():
    ckpt = safe_load(FIX / "official_checkpoint.pth")
    feats = torch.load(FIX / "official_checkpoint_features.pt", weights_only=True)
    teacher = _small(masked=False, return_all_tokens=True)
    sd = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    teacher.load_state_dict(sd, strict=True)
    teacher.eval()
    for fused in (True, False):
        teacher.set_fused_attn(fused)
        with torch.no_grad():
            torch.testing.assert_close(teacher(feats["x"]), feats["teacher_backbone_all_tokens"],
                                       atol=1e-5, rtol=0)
    student = _small(masked=True, return_all_tokens=True, drop_path_rate=0.1)
    pre = "module.backbone."
    ssd = {k[len(pre):]: v for k, v in ckpt["student"].items() if k.startswith(pre)}
    student.load_state_dict(ssd, strict=True)
    assert student.masked_embed.shape == (1, 48)


# ---------------------------------------------------------------- names and shapes (spec 2.5)
def _expected_backbone(D, depth, patch, n_tokens, student):
    """Spec 2.5 table written out: (key, shape) in registration order."""
    keys = [("cls_token", (1, 1, D)), ("pos_embed", (1, n_tokens, D))]
    if student:
        keys.append(("masked_embed", (1, D)))
    keys += [("patch_embed.proj.weight", (D, 3, patch, patch)), ("patch_embed.proj.bias", (D,))]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "norm1.weight", (D,)), (b + "norm1.bias", (D,)),
                 (b + "attn.qkv.weight", (3 * D, D)), (b + "attn.qkv.bias", (3 * D,)),
                 (b + "attn.proj.weight", (D, D)), (b + "attn.proj.bias", (D,)),
                 (b + "norm2.weight", (D,)), (b + "norm2.bias", (D,)),
                 (b + "mlp.fc1.weight", (4 * D, D)), (b + "mlp.fc1.bias", (4 * D,)),
                 (b + "mlp.fc2.weight", (D, 4 * D)), (b + "mlp.fc2.bias", (D,))]
    keys += [("norm.weight", (D,)), ("norm.bias", (D,))]
    return keys


@pytest.mark.parametrize("factory,D", [(vit_small, 384), (vit_base, 768)], ids=["small", "base"])
@pytest.mark.parametrize("student", [True, False], ids=["student", "teacher"])
def test_backbone_names_and_shapes(factory, D, student):
    with torch.device("meta"):
        if student:
            m = factory(patch_size=16, drop_path_rate=0.1, return_all_tokens=True,
                        masked_im_modeling=True)
        else:
            m = factory(patch_size=16, return_all_tokens=True)
    expected = _expected_backbone(D, 12, 16, 197, student)
    got = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert got == expected
    assert [(k, tuple(p.shape)) for k, p in m.named_parameters()] == expected
    assert not list(m.buffers())
    assert m.embed_dim == m.num_features == D
    assert m.get_num_layers() == 12


def test_factories_config():
    with torch.device("meta"):
        for f, D, depth, heads in [(vit_tiny, 192, 12, 3), (vit_small, 384, 12, 6),
                                   (vit_base, 768, 12, 12), (vit_large, 1024, 24, 16)]:
            m = f(patch_size=8)
            assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (D, depth, heads)
            assert m.blocks[0].attn.qkv.bias is not None
            assert m.norm.eps == 1e-6 and m.pos_embed.shape == (1, 28 * 28 + 1, D)
            assert not hasattr(m, "masked_embed")


def test_layerscale_and_mean_pooling_names():
    m = VisionTransformer(img_size=[32], patch_size=8, embed_dim=12, depth=1, num_heads=2,
                          init_values=0.1, use_mean_pooling=True)
    keys = list(m.state_dict().keys())
    assert keys[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert keys[4:6] == ["blocks.0.gamma_1", "blocks.0.gamma_2"]
    assert keys[-2:] == ["fc_norm.weight", "fc_norm.bias"]
    assert not any(k.startswith("norm.") for k in keys)
    out = m(torch.randn(2, 3, 32, 32), return_all_tokens=True)
    torch.testing.assert_close(out[:, 0], m.fc_norm(out[:, 1:].mean(1)))


# ---------------------------------------------------------------- init (spec 2.3)
def test_init_statistics():
    torch.manual_seed(0)
    # vit_small width and patch, 2 blocks (init is per module, depth does not matter)
    m = VisionTransformer(patch_size=16, embed_dim=384, depth=2, num_heads=6, qkv_bias=True,
                          masked_im_modeling=True)
    assert torch.count_nonzero(m.masked_embed) == 0
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            assert abs(mod.weight.std().item() - 0.02) < 0.002, name
            assert torch.count_nonzero(mod.bias) == 0, name
        elif isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002
    assert abs(m.cls_token.std().item() - 0.02) < 0.01
    # patch embedding keeps PyTorch's default (kaiming-uniform) Conv2d init: |w| <= 1/sqrt(fan_in)
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert m.patch_embed.proj.weight.abs().max().item() <= bound
    assert m.patch_embed.proj.weight.abs().max().item() > 0.9 * bound


# ---------------------------------------------------------------- behaviour
def test_sdpa_and_explicit_agree_train_mode():
    torch.manual_seed(0)
    m = _small(masked=True, return_all_tokens=True)
    with torch.no_grad():
        m.masked_embed.normal_()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.rand(3, 4, 4) > 0.5
    # float32 forward: same numbers
    with torch.no_grad():
        a = m.set_fused_attn(True)(x, mask=mask)
        b = m.set_fused_attn(False)(x, mask=mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # float64 (float32 gradients of this loss are too noisy to compare tightly): same gradients
    m = m.double()
    x = x.double()
    outs, grads = [], []
    for fused in (True, False):
        m.zero_grad()
        m.set_fused_attn(fused)
        out = m(x, mask=mask)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert all(blk.attn.fused_attn is False for blk in m.blocks)


def test_masked_embed_gradient_only_through_masked_positions():
    torch.manual_seed(0)
    m = _small(masked=True, return_all_tokens=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    m(x, mask=none).sum().backward()
    assert torch.count_nonzero(m.masked_embed.grad) == 0
    m.zero_grad()
    x.grad = None
    mask = none.clone()
    mask[0, 1, 2] = True
    m(x, mask=mask).sum().backward()
    assert torch.count_nonzero(m.masked_embed.grad) > 0
    # the masked patch's pixels no longer influence the output, the others do
    g = x.grad[0, :, 8:16, 16:24]
    assert torch.count_nonzero(g) == 0
    assert torch.count_nonzero(x.grad[0, :, 0:8, 0:8]) > 0
    assert torch.count_nonzero(x.grad[1, :, 8:16, 16:24]) > 0


def test_mask_replaces_before_pos_embed():
    torch.manual_seed(0)
    m = _small(masked=True)
    with torch.no_grad():
        m.masked_embed.normal_()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1, 3, 0] = True
    tok = m.prepare_tokens(x, mask=mask)
    t = 1 + 3 * 4 + 0  # row-major flattening after the CLS token
    torch.testing.assert_close(tok[1, t], m.masked_embed[0] + m.pos_embed[0, t])
    plain = m.prepare_tokens(x)
    torch.testing.assert_close(tok[0], plain[0])
    # fp16 activation map: masked_embed is cast to the map dtype (quirk Q35)
    fmap = torch.zeros(2, 48, 4, 4, dtype=torch.float16)
    out = m.mask_model(fmap, mask)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out[1, :, 3, 0], m.masked_embed[0].half())


def test_mask_required_and_checked():
    m = _small(masked=True)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="mask"):
        m(x)
    with pytest.raises(ValueError, match="patch grid"):
        m(x, mask=torch.zeros(1, 3, 3, dtype=torch.bool))
    m.masked_im_modeling = False  # the trainer's local-crop pass
    assert m(x).shape == (1, 48)


def test_pos_embed_interpolation_rule():
    torch.manual_seed(0)
    m = VisionTransformer(patch_size=16, embed_dim=384, depth=1, num_heads=6, return_all_tokens=True)
    # square, matching count: table returned unchanged
    tok = torch.zeros(1, 197, 384)
    assert m.interpolate_pos_encoding(tok, 224, 224) is m.pos_embed
    # local crop 96 px: 14x14 -> 6x6 by scale factor 6.1/14 (not size=)
    pe = m.interpolate_pos_encoding(torch.zeros(1, 37, 384), 96, 96)
    grid = m.pos_embed[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    ref = nn.functional.interpolate(grid, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic")
    torch.testing.assert_close(pe[0, 1:], ref.permute(0, 2, 3, 1).reshape(36, 384))
    torch.testing.assert_close(pe[0, 0], m.pos_embed[0, 0])
    small = _small(masked=False, return_all_tokens=True)
    # any input size works (non-divisible sizes are floored like the official Conv2d)
    assert small(torch.randn(1, 3, 36, 44)).shape == (1, 1 + 4 * 5, 48)
    assert small(torch.randn(1, 3, 16, 16)).shape == (1, 1 + 4, 48)


def test_drop_path_rates_and_train_mode_stochastic():
    m = _small(masked=False, drop_path_rate=0.2, return_all_tokens=True)
    assert isinstance(m.blocks[0].drop_path, nn.Identity)
    assert abs(m.blocks[1].drop_path.drop_prob - 0.2) < 1e-7
    x = torch.randn(8, 3, 32, 32)
    m.eval()
    a, b = m(x), m(x)
    torch.testing.assert_close(a, b)


def test_autocast_forward_backward():
    torch.manual_seed(0)
    m = _small(masked=True, return_all_tokens=True, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, mask=mask)
        ref = m.set_fused_attn(False)(x, mask=mask)
    assert out.shape == (2, 17, 48) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert m.masked_embed.grad is not None and torch.count_nonzero(m.masked_embed.grad) > 0
    assert ref.shape == out.shape
