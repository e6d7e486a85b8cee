"""Tests of models/head.py against the official fixtures and spec section 1.5."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from ibot.utils.checkpoint import safe_load
from ibot.models.head import DINOHead, iBOTHead, official_param_name
from official_fixtures import FIXTURES

FIX = FIXTURES


@pytest.fixture(scope="module")
def head_cases():
    return torch.load(FIX / "heads.pt", weights_only=True)


def _trainable_official(head):
    return [official_param_name(n) for n, p in head.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- official numbers
@pytest.mark.parametrize("idx", [0, 1, 2], ids=["unshared-normlast", "shared", "unshared-trainable-g"])
def test_fixture_heads(head_cases, idx):
    case = head_cases[idx]
    head = iBOTHead(**case["kwargs"])
    # same trainable set before and after loading
    assert _trainable_official(head) == case["trainable"]
    head.load_state_dict(case["state_dict"], strict=True)
    assert _trainable_official(head) == case["trainable"]
    with torch.no_grad():
        cls_out, patch_out = head(case["x"])
        out2d = head(case["x2d"])
    kw = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_out, case["cls_out"], **kw)
    torch.testing.assert_close(patch_out, case["patch_out"], **kw)
    torch.testing.assert_close(out2d, case["out2d"], **kw)
    # state_dict emits exactly the official names, in the official order, with the same values
    sd = head.state_dict()
    assert list(sd.keys()) == list(case["state_dict"].keys())
    for k, v in sd.items():
        assert torch.equal(v, case["state_dict"][k]), k
    # round trip into a fresh head
    fresh = iBOTHead(**case["kwargs"])
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(case["x"])[1], case["patch_out"], **kw)
    if case["kwargs"]["shared_head"]:
        assert head.last_layer2 is head.last_layer
        assert sd["last_layer2.weight_v"].data_ptr() == sd["last_layer.weight_v"].data_ptr()


def test_official_checkpoint_heads_load():
    ckpt = safe_load(FIX / "official_checkpoint.pth")
    kw = dict(patch_out_dim=64, hidden_dim=32, bottleneck_dim=16, shared_head=True)
    teacher = iBOTHead(48, 64, **kw)
    teacher.load_state_dict({k[5:]: v for k, v in ckpt["teacher"].items() if k.startswith("head.")},
                            strict=True)
    student = iBOTHead(48, 64, norm_last_layer=False, **kw)
    pre = "module.head."
    student.load_state_dict({k[len(pre):]: v for k, v in ckpt["student"].items()
                             if k.startswith(pre)}, strict=True)
    # the official AdamW state is positional over the trainable student parameters, in
    # named_parameters order, split into (regularised: ndim > 1 and not bias, then the others)
    from ibot.models.vision_transformer import VisionTransformer
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                 qkv_bias=True, masked_im_modeling=True)
    named = [("backbone." + n, p) for n, p in backbone.named_parameters()] + \
            [("head." + n, p) for n, p in student.named_parameters()]
    named = [(n, p) for n, p in named if p.requires_grad]
    reg = [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]
    noreg = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
    groups = ckpt["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(reg), len(noreg)]
    state = ckpt["optimizer"]["state"]
    names = [n for n, p in named if not (n.endswith(".bias") or p.ndim == 1)] + \
            [n for n, p in named if n.endswith(".bias") or p.ndim == 1]
    without_state = []
    for idx, n, p in zip(groups[0]["params"] + groups[1]["params"], names, reg + noreg):
        if idx in state:
            assert state[idx]["exp_avg"].shape == p.shape, n
        else:
            without_state.append(official_param_name(n))
    # epoch 0 with freeze_last_layer=1: the last layer got no gradient, hence no Adam state
    assert without_state == ["head.last_layer.weight_g", "head.last_layer.weight_v"]


# ---------------------------------------------------------------- names and shapes (spec 1.5 / 2.5)
def _expected_head(D, K, Kp, shared):
    """Spec tables written out (no head norm, bottleneck 256, hidden 2048)."""
    keys = [("mlp.0.weight", (2048, D)), ("mlp.0.bias", (2048,)),
            ("mlp.2.weight", (2048, 2048)), ("mlp.2.bias", (2048,)),
            ("mlp.4.weight", (256, 2048)), ("mlp.4.bias", (256,)),
            ("last_layer.weight_g", (K, 1)), ("last_layer.weight_v", (K, 256))]
    params = list(keys)
    keys += [("last_layer2.weight_g", (Kp, 1)), ("last_layer2.weight_v", (Kp, 256))]
    if not shared:
        params = list(keys)
    return keys, params


@pytest.mark.parametrize("D", [384, 768])
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_default_head_names_and_shapes(D, shared):
    K = 8192
    with torch.device("meta"):
        head = iBOTHead(D, K, patch_out_dim=K, shared_head=shared)
    keys, params = _expected_head(D, K, K, shared)
    assert [(k, tuple(v.shape)) for k, v in head.state_dict().items()] == keys
    # parameter registration order (optimizer state is positional): weight_g before weight_v
    assert [(official_param_name(n), tuple(p.shape)) for n, p in head.named_parameters()] == params
    assert _trainable_official(head) == [k for k, _ in params if not k.endswith("weight_g")]


def test_unshared_patch_dim():
    head = iBOTHead(24, 40, patch_out_dim=56, hidden_dim=16, bottleneck_dim=8)
    sd = head.state_dict()
    assert sd["last_layer2.weight_v"].shape == (56, 8) and sd["last_layer2.weight_g"].shape == (56, 1)
    c, p = head(torch.randn(2, 5, 24))
    assert c.shape == (2, 40) and p.shape == (2, 4, 56)


# ---------------------------------------------------------------- Q1
def test_q1_teacher_shared_gets_student_last_layer2():
    torch.manual_seed(0)
    kw = dict(patch_out_dim=32, hidden_dim=16, bottleneck_dim=8)
    student = iBOTHead(12, 32, norm_last_layer=False, shared_head=False, **kw)
    teacher = iBOTHead(12, 32, shared_head=True, **kw)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    sd = student.state_dict()
    assert not torch.equal(sd["last_layer.weight_v"], sd["last_layer2.weight_v"])
    result = teacher.load_state_dict(sd, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    tsd = teacher.state_dict()
    for name in ("weight_g", "weight_v"):
        torch.testing.assert_close(tsd["last_layer." + name], sd["last_layer2." + name], rtol=0, atol=0)
        torch.testing.assert_close(tsd["last_layer2." + name], sd["last_layer2." + name], rtol=0, atol=0)
    for k in ("mlp.0.weight", "mlp.4.bias"):
        assert torch.equal(tsd[k], sd[k])


# ---------------------------------------------------------------- init
def test_init_statistics():
    torch.manual_seed(0)
    head = iBOTHead(384, 4096, patch_out_dim=2048, shared_head=False)
    for i in (0, 2, 4):
        lin = head.mlp[i]
        assert abs(lin.weight.std().item() - 0.02) < 0.002
        assert torch.count_nonzero(lin.bias) == 0
    for layer in (head.last_layer, head.last_layer2):
        g = layer.parametrizations.weight.original0
        v = layer.parametrizations.weight.original1
        assert torch.all(g == 1) and not g.requires_grad and v.requires_grad
        # v keeps PyTorch's default Linear init: U(-1/sqrt(256), 1/sqrt(256))
        assert v.abs().max().item() <= 1 / 16 and v.abs().max().item() > 0.95 / 16
        assert abs(v.std().item() - 1 / 16 / math.sqrt(3)) < 0.002
        # effective weight rows have norm g = 1
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.out_features))
    trainable_g = iBOTHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert trainable_g.last_layer.parametrizations.weight.original0.requires_grad


# ---------------------------------------------------------------- fast-path pieces
def test_fast_path_methods_match_forward():
    torch.manual_seed(0)
    head = iBOTHead(12, 20, patch_out_dim=24, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(3, 6, 12)
    cls_out, patch_out = head(x)
    h = head.bottleneck(x)
    assert h.shape == (3, 6, 8)
    torch.testing.assert_close(h.norm(dim=-1), torch.ones(3, 6))
    torch.testing.assert_close(head.cls_logits(h[:, 0]), cls_out)
    torch.testing.assert_close(head.patch_logits(h[:, 1:]), patch_out)
    assert head.patch_logits_are_linear and head.cls_logits_are_linear
    # mean of logits == logits of the mean
    torch.testing.assert_close(head.patch_logits(h[:, 1:].mean(1)), patch_out.mean(1))
    # 2-D input: plain DINO head
    x2 = torch.randn(4, 12)
    torch.testing.assert_close(head(x2), head.cls_logits(head.bottleneck(x2)))
    dino = DINOHead(12, 20, hidden_dim=16, bottleneck_dim=8)
    assert dino(x2).shape == (4, 20) and dino.cls_logits_are_linear


@pytest.mark.parametrize("shared", [False, True])
def test_no_bottleneck_variant_is_official(shared):
    torch.manual_seed(0)
    head = iBOTHead(12, 20, patch_out_dim=20, hidden_dim=16, bottleneck_dim=0, shared_head=shared)
    assert head.last_layer is None and head.last_layer2 is None
    assert not head.patch_logits_are_linear
    assert (head.mlp2 is head.mlp[-1]) == shared
    assert head.mlp[-1].out_features == 20
    x = torch.randn(3, 6, 12)
    cls_out, patch_out = head(x)
    hid = head.mlp[:-1](x)  # official: x = mlp[:-1](x); mlp[-1](x[:, 0]); mlp2(x[:, 1:])
    torch.testing.assert_close(cls_out, head.mlp[-1](hid[:, 0]))
    torch.testing.assert_close(patch_out, head.mlp2(hid[:, 1:]))
    torch.testing.assert_close(head(x[:, 0]), head.mlp(x[:, 0]))


# ---------------------------------------------------------------- norms (Q20)
def test_bn_head_shares_one_norm_and_normalises_tokens():
    torch.manual_seed(0)
    head = iBOTHead(12, 20, patch_out_dim=20, hidden_dim=16, bottleneck_dim=8, norm="bn")
    assert isinstance(head.mlp[1], nn.BatchNorm1d) and head.mlp[1] is head.mlp[4]
    keys = list(head.state_dict().keys())
    assert keys[:8] == ["mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias",
                        "mlp.1.running_mean", "mlp.1.running_var", "mlp.1.num_batches_tracked",
                        "mlp.3.weight"]
    assert [n for n, _ in head.named_parameters()][:6] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias", "mlp.3.weight", "mlp.3.bias"]
    x = torch.randn(3, 5, 12)
    y = head.mlp[0](x)
    ref = (y - y.mean((0, 1))) / torch.sqrt(y.var((0, 1), unbiased=False) + 1e-5)
    got = head.mlp[:2](x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    c, p = head(x)
    assert c.shape == (3, 20) and p.shape == (3, 4, 20)


def test_ln_head_and_unsupported_norms():
    head = iBOTHead(12, 20, patch_out_dim=20, hidden_dim=16, bottleneck_dim=8, norm="ln")
    assert isinstance(head.mlp[1], nn.LayerNorm) and head.mlp[1] is head.mlp[4]
    head = iBOTHead(12, 20, patch_out_dim=20, hidden_dim=16, bottleneck_dim=8, last_norm="ln")
    assert not head.patch_logits_are_linear
    c, p = head(torch.randn(2, 3, 12))
    torch.testing.assert_close(p.mean(-1), torch.zeros(2, 2), atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="--norm_in_head"):
        iBOTHead(12, 20, hidden_dim=16, bottleneck_dim=8, norm="psyncbn")
    with pytest.raises(ValueError, match="--norm_in_head"):
        iBOTHead(12, 20, hidden_dim=16, bottleneck_dim=8, norm="gn")


def test_deepcopy_keeps_official_names_and_sharing():
    head = iBOTHead(12, 20, patch_out_dim=20, hidden_dim=16, bottleneck_dim=8, shared_head=True)
    clone = copy.deepcopy(head)
    assert clone.last_layer2 is clone.last_layer and clone.last_layer is not head.last_layer
    assert list(clone.state_dict().keys()) == list(head.state_dict().keys())
    assert "last_layer.weight_g" in clone.state_dict()
