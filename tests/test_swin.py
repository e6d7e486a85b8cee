"""Tests of models/swin_transformer.py against the official iBOT Swin (fixture + spec section 3)."""

import math

import pytest
import torch
import torch.nn as nn

from ibot.models.swin_transformer import (
    SwinTransformer,
    check_swin_args,
    shifted_window_mask,
    swin_base,
    swin_large,
    swin_small,
    swin_tiny,
)
from official_fixtures import FIXTURES

FIXTURE = FIXTURES / "swin_small_config.pt"
ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.exists():
        pytest.skip(f"fixture {FIXTURE} not available")
    return torch.load(FIXTURE, weights_only=True)


def _fixture_model(fixture, fused):
    model = SwinTransformer(**fixture["config"]).eval()
    model.load_state_dict(fixture["state_dict"], strict=True)
    model.set_fused_attn(fused)
    return model


def _small_model(**kw):
    cfg = dict(img_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4,
               num_classes=0)
    cfg.update(kw)
    return SwinTransformer(**cfg)


# ------------------------------------------------------------------------------ fixture parity
def test_fixture_state_dict_names_order_shapes(fixture):
    model = SwinTransformer(**fixture["config"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, tuple(v.shape)) for k, v in fixture["state_dict"].items()]
    assert ours == theirs
    assert not any("attn_mask" in k for k, _ in ours)
    # the persistent index buffer is identical to the official one
    for k, v in model.state_dict().items():
        if k.endswith("relative_position_index"):
            assert torch.equal(v, fixture["state_dict"][k])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_fixture_outputs(fixture, fused):
    model = _fixture_model(fixture, fused)
    with torch.no_grad():
        out_masked = model(fixture["x"], mask=fixture["mask"])
        out_plain = model(fixture["x"])
        out_small = model(fixture["x_small"])
    assert out_masked.shape == fixture["out_masked"].shape == (2, 65, 48)
    torch.testing.assert_close(out_masked, fixture["out_masked"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_plain, fixture["out_plain"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_small, fixture["out_small"], atol=ATOL, rtol=0)
    # image 0 has an empty mask: identical to the unmasked output
    torch.testing.assert_close(out_masked[0], out_plain[0], atol=ATOL, rtol=0)
    # pooled output = token 0 of the all-token output
    with torch.no_grad():
        pooled = model(fixture["x"], return_all_tokens=False)
    torch.testing.assert_close(pooled, fixture["out_plain"][:, 0], atol=ATOL, rtol=0)


def test_fixture_intermediate_layers_last_block_matches_forward(fixture):
    model = _fixture_model(fixture, True)
    with torch.no_grad():
        inter = model.get_intermediate_layers(fixture["x"], n=4)
        pooled = model.get_intermediate_layers(fixture["x"], n=4, return_patch_avgpool=True)
    # n=4 with depths [2, 2]: two stage-1 blocks (16x16 tokens, 24 ch), two stage-2 blocks
    assert [tuple(t.shape) for t in inter] == [(2, 257, 24)] * 2 + [(2, 65, 48)] * 2
    assert [tuple(t.shape) for t in pooled] == [(2, 24)] * 2 + [(2, 48)] * 2
    torch.testing.assert_close(inter[-1], fixture["out_plain"], atol=ATOL, rtol=0)
    for full, avg in zip(inter, pooled):
        torch.testing.assert_close(full[:, 0], avg)
        torch.testing.assert_close(full[:, 1:].mean(1), avg, atol=1e-6, rtol=0)
    # earlier stages are not normed by the final norm
    assert model.get_num_layers() == 4
    with pytest.raises(ValueError):
        model.get_intermediate_layers(fixture["x"], n=5)


# ------------------------------------------------------------------------------ official names
VARIANTS = {  # embed_dim, depths, heads (spec section 3)
    "swin_tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin_small": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "swin_base": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "swin_large": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
}
FACTORIES = {"swin_tiny": swin_tiny, "swin_small": swin_small, "swin_base": swin_base,
             "swin_large": swin_large}


def expected_state_dict_table(name, window, masked, img_size=224, num_classes=1000):
    """Official key -> shape list, derived from the rules of spec section 3."""
    C, depths, heads = VARIANTS[name]
    rows = []
    if masked:
        rows.append(("masked_embed", (1, C)))
    rows += [("patch_embed.proj.weight", (C, 3, 4, 4)), ("patch_embed.proj.bias", (C,)),
             ("patch_embed.norm.weight", (C,)), ("patch_embed.norm.bias", (C,))]
    for s, (d, h) in enumerate(zip(depths, heads)):
        dim = C * 2 ** s
        res = img_size // 4 // 2 ** s
        w = res if res <= window else window  # window shrinks to the nominal resolution
        for b in range(d):
            p = f"layers.{s}.blocks.{b}."
            rows += [
                (p + "norm1.weight", (dim,)), (p + "norm1.bias", (dim,)),
                (p + "attn.relative_position_bias_table", ((2 * w - 1) ** 2, h)),
                (p + "attn.relative_position_index", (w * w, w * w)),
                (p + "attn.qkv.weight", (3 * dim, dim)), (p + "attn.qkv.bias", (3 * dim,)),
                (p + "attn.proj.weight", (dim, dim)), (p + "attn.proj.bias", (dim,)),
                (p + "norm2.weight", (dim,)), (p + "norm2.bias", (dim,)),
                (p + "mlp.fc1.weight", (4 * dim, dim)), (p + "mlp.fc1.bias", (4 * dim,)),
                (p + "mlp.fc2.weight", (dim, 4 * dim)), (p + "mlp.fc2.bias", (dim,)),
            ]
        if s < len(depths) - 1:
            rows += [(f"layers.{s}.downsample.reduction.weight", (2 * dim, 4 * dim)),
                     (f"layers.{s}.downsample.norm.weight", (4 * dim,)),
                     (f"layers.{s}.downsample.norm.bias", (4 * dim,))]
    F = C * 2 ** (len(depths) - 1)
    rows += [("norm.weight", (F,)), ("norm.bias", (F,)),
             ("head.weight", (num_classes, F)), ("head.bias", (num_classes,))]
    return rows


@pytest.mark.parametrize("name", ["swin_tiny", "swin_base"])
@pytest.mark.parametrize("window", [7, 14])
@pytest.mark.parametrize("masked", [False, True])
def test_official_key_table(name, window, masked):
    with torch.device("meta"):
        model = FACTORIES[name](window_size=window, masked_im_modeling=masked)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected_state_dict_table(name, window, masked)
    C, depths, heads = VARIANTS[name]
    assert [len(layer.blocks) for layer in model.layers] == depths
    assert model.embed_dim == C
    assert model.num_features == C * 8
    assert model.get_num_layers() == sum(depths)
    # windows and shifts: shrink (and no shift) where the nominal resolution <= window
    for s, layer in enumerate(model.layers):
        res = 56 // 2 ** s
        for b, blk in enumerate(layer.blocks):
            if res <= window:
                assert (blk.window_size, blk.shift_size) == (res, 0)
            else:
                assert (blk.window_size, blk.shift_size) == (window, (window // 2) * (b % 2))


@pytest.mark.parametrize("name,dpr", [("swin_tiny", 0.1), ("swin_small", 0.2),
                                      ("swin_base", 0.2), ("swin_large", 0.2)])
def test_factory_defaults(name, dpr):
    with torch.device("meta"):
        model = FACTORIES[name]()
        model0 = FACTORIES[name](drop_path_rate=0.0, return_all_tokens=True, img_size=96)
    last = model.layers[-1].blocks[-1].drop_path
    assert isinstance(last, nn.Module) and math.isclose(last.drop_prob, dpr, rel_tol=1e-6)
    assert isinstance(model.layers[0].blocks[0].drop_path, nn.Identity)
    assert all(isinstance(b.drop_path, nn.Identity) for l in model0.layers for b in l.blocks)
    assert model0.return_all_tokens and not model.return_all_tokens
    assert not hasattr(model, "masked_embed")
    assert model.window_size == 7
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-6}


def test_init():
    torch.manual_seed(0)
    model = _small_model(masked_im_modeling=True)
    assert torch.count_nonzero(model.masked_embed) == 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert 0.01 < m.weight.std().item() < 0.03
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert 0 < table.std().item() < 0.03


# ------------------------------------------------------------------------------ behaviour
def _reference_shift_mask(Hp, Wp, ws, s):
    """Slice-based construction exactly as described in the spec."""
    img = torch.zeros(Hp, Wp)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for w in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[h, w] = cnt
            cnt += 1
    win = img.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


@pytest.mark.parametrize("Hp,Wp,ws,s", [(8, 8, 4, 2), (28, 28, 7, 3), (7, 7, 7, 3),
                                         (12, 8, 4, 2), (14, 14, 7, 3)])
def test_shift_mask_matches_slice_construction(Hp, Wp, ws, s):
    torch.testing.assert_close(shifted_window_mask(Hp, Wp, ws, s), _reference_shift_mask(Hp, Wp, ws, s))


@pytest.mark.parametrize("size", [32, 48, 64, 96])
def test_sdpa_matches_explicit_with_padding_and_shift(size):
    torch.manual_seed(0)
    model = _small_model(img_size=96, window_size=5, masked_im_modeling=True).eval()
    nn.init.normal_(model.masked_embed)
    x = torch.randn(2, 3, size, size)
    g = size // 16  # final-stage grid of this 3-stage model (stride 16)
    mask = torch.rand(2, g, g) > 0.5
    with torch.no_grad():
        a = model.set_fused_attn(True)(x, return_all_tokens=True, mask=mask)
        b = model.set_fused_attn(False)(x, return_all_tokens=True, mask=mask)
    assert a.shape == (2, 1 + g * g, 64)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_masked_embed_gradient_only_through_masked_positions():
    torch.manual_seed(0)
    model = _small_model(masked_im_modeling=True).train()
    nn.init.normal_(model.masked_embed)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)  # final grid of 64 px / stride 16
    mask[0, 1, 2] = True
    mask[1, 3, 0] = True
    out = model(x, return_all_tokens=True, mask=mask)
    out.pow(2).sum().backward()
    assert model.masked_embed.grad is not None
    assert model.masked_embed.grad.abs().sum() > 0
    # pixels under a masked cell (16x16 px) receive no gradient, the others do
    pix = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(x)
    assert torch.all(x.grad[pix] == 0)
    assert torch.count_nonzero(x.grad[~pix]) > 0.9 * (~pix).sum()

    # with an empty mask the masked embedding gets no gradient at all
    model.zero_grad(set_to_none=True)
    model(x, return_all_tokens=True, mask=torch.zeros_like(mask)).sum().backward()
    assert model.masked_embed.grad is None or torch.all(model.masked_embed.grad == 0)


def test_mask_replaces_embeddings_after_patch_norm():
    torch.manual_seed(0)
    model = _small_model(masked_im_modeling=True).eval()
    nn.init.normal_(model.masked_embed)
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = True
    emb = model.patch_embed(x)
    masked = model.mask_model(emb, mask)
    cell = masked[0, :, 0:4, 4:8]
    assert torch.equal(cell, model.masked_embed[0][:, None, None].expand_as(cell))
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[0:4, 4:8] = False
    assert torch.equal(masked[0][:, keep], emb[0][:, keep])


def test_mask_without_masked_embed_raises():
    model = _small_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="masked_embed"):
        model(x, mask=torch.zeros(1, 4, 4, dtype=torch.bool))
    model(x, mask=None)  # fine without a mask


def test_mask_grid_must_divide():
    model = _small_model(masked_im_modeling=True).eval()
    with pytest.raises(ValueError, match="mask grid"):
        model(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("window", [7, 14])
def test_swin_tiny_small_crops_run(window):
    torch.manual_seed(0)
    model = swin_tiny(window_size=window, return_all_tokens=True, masked_im_modeling=True).eval()
    with torch.no_grad():
        out96 = model(torch.randn(1, 3, 96, 96))
        out32 = model(torch.randn(1, 3, 32, 32), return_all_tokens=False)
        out64m = model(torch.randn(1, 3, 64, 64), mask=torch.ones(1, 2, 2, dtype=torch.bool))
    assert out96.shape == (1, 1 + 9, 768)  # 96 px -> 3x3 final-stage tokens
    assert out32.shape == (1, 768)
    assert out64m.shape == (1, 1 + 4, 768)
    assert torch.isfinite(out96).all() and torch.isfinite(out32).all()


def test_non_square_and_odd_grids():
    torch.manual_seed(0)
    model = _small_model(img_size=96, window_size=5).eval()
    with torch.no_grad():
        a = model(torch.randn(1, 3, 48, 80), return_all_tokens=True)
        b = model(torch.randn(1, 3, 40, 40), return_all_tokens=True)  # 10 -> 5 -> 3 tokens
    assert a.shape == (1, 1 + 3 * 5, 64)
    assert b.shape == (1, 1 + 3 * 3, 64)


def test_selfattention_api():
    torch.manual_seed(0)
    model = _small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = model.get_last_selfattention(x)
        also = model.get_selfattention(x, n=1)
        every = model.get_selfattention(x, n=2)
        # official convention: already embedded tokens are accepted too
        tokens = model.patch_embed(x).flatten(2).transpose(1, 2)
        from_tokens = model.get_last_selfattention(tokens)
    # last stage: 4x4 tokens, nominal 4 <= window 4 -> one 4x4 window, 4 heads
    assert last.shape == (2, 4, 16, 16)
    torch.testing.assert_close(last.sum(-1), torch.ones(2, 4, 16))
    torch.testing.assert_close(also, last)
    torch.testing.assert_close(from_tokens, last)
    assert len(every) == model.get_num_layers()
    assert every[0].shape == (2 * 16, 2, 16, 16)  # 16x16 tokens -> 16 windows of 4x4
    torch.testing.assert_close(every[-1], last)


# ------------------------------------------------------------------------------ flag checks
def test_check_swin_args():
    assert check_swin_args(4, 7, 224, 96) == []
    assert check_swin_args(4, 14, 224, 96) == []
    errs = check_swin_args(16, 7, 224, 96)
    assert len(errs) == 1 and "--patch_size" in errs[0]
    errs = check_swin_args(4, 7, 200, 90)
    assert len(errs) == 2
    assert "--global_crops_size" in errs[0] and "--local_crops_size" in errs[1]
    assert check_swin_args(4, 7, 224, 90, local_crops_number=0) == []
    errs = check_swin_args(4, 0, 224, 96)
    assert len(errs) == 1 and "--window_size" in errs[0]
