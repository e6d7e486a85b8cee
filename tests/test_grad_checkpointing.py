"""``--grad_checkpointing``: activation checkpointing of the student backbone changes nothing but memory.

Tiny ViT (32 px, patch 8 -> 4x4 grid, dim 48, depth 3, 3 heads; head hidden 32, bottleneck 16, 64
prototypes) built by ``ibot.pretrain.build_networks`` / ``wrap_and_init_teacher`` from parsed flags,
with ``--drop_path 0.4`` so that the blocks draw random numbers: the recomputation in the backward
pass must replay the same drop-path draws (``torch.utils.checkpoint`` restores the RNG state; the
negative control below shows that the test notices when it does not). Two identical copies (same
seed) take two full ``train_step``s, with and without checkpointing, on the same batches.

Tolerance. The recomputation runs the same fp32 kernels on the same inputs in the same order; on
this machine (one thread) losses, every gradient and the teacher after two steps are bitwise equal,
in both the fast and the reference step. The assertions allow 1e-6 relative (plus ``1e-7 * max|g|``
absolute for gradients, whose near-zero entries have no meaningful relative error), so that another
BLAS or thread count cannot make them flaky, while a wrong drop-path replay fails them (negative
control).
"""
import copy
import random
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import ibot.models.swin_transformer as swin_mod
import ibot.models.vision_transformer as vit_mod
from ibot.train import driver as pretrain
from ibot.train.flags import get_args_parser
from ibot.data.masking import MaskGenerator
from ibot.train.optim import build_optimizer, get_params_groups
from ibot.train.context import RunContext
from ibot.train.step import iBOTTrainStep, unwrap
from ibot.models.swin_transformer import SwinTransformer
from tiny_models import register_tiny_arch, tiny_vit
from repo_files import load_repo_file

B = 4          # images per crop
GRID = (4, 4)  # 32-px global crops, patch 8


def vit_ckpt_test(patch_size=8, **kwargs):
    """A 3-block, 48-dim ViT with the official block structure (drop-path rates 0, r/2, r)."""
    return tiny_vit(depth=3, patch_size=patch_size, **kwargs)


@pytest.fixture(autouse=True)
def _tiny_arch(monkeypatch):
    yield from register_tiny_arch("vit_ckpt_test", vit_ckpt_test)


def make_args(*flags, train_step="fast"):
    """Parsed ``main_ibot`` flags of the tiny recipe (2 global 32-px + 2 local 16-px crops, fp32, CPU)."""
    base = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
            "--local_crops_number", "2", "--out_dim", "64", "--patch_out_dim", "64", "--head_hidden_dim", "32",
            "--head_bottleneck_dim", "16", "--drop_path", "0.4", "--epochs", "3",
            "--warmup_teacher_temp_epochs", "2", "--freeze_last_layer", "0", "--clip_grad", "0.3",
            "--batch_size_per_gpu", str(B), "--teacher_temp", "0.07"]
    args = get_args_parser().parse_args(base + list(flags))
    args.arch = "vit_ckpt_test"
    args.precision, args.train_step = "fp32", train_step
    return args


def make_batches(n=2):
    """``n`` batches ``(images, masks)``: 2 global + 2 local crops, block masks (ratios 0 or 0.5 ± 0.2)."""
    batches = []
    for seed in range(n):
        g = torch.Generator().manual_seed(1000 + seed)
        images = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
        images += [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
        rng = random.Random(seed)
        gen = MaskGenerator(GRID, [0.0, 0.5], [0.0, 0.2], pred_shape="block")
        masks = [torch.from_numpy(np.stack([gen(rng) for _ in range(B)])) for _ in range(2)]
        masks[1][2, 1:3, :] = True  # at least one image with masked tokens
        batches.append((images, masks))
    return batches


def run_steps(args, batches, seed=0):
    """``len(batches)`` train_steps from the same initialisation and RNG state; returns the per-step
    losses and student gradients, and the student and teacher after the steps."""
    torch.manual_seed(seed)
    student, teacher = pretrain.build_networks(args)
    ctx = RunContext(device=torch.device("cpu"), precision=args.precision, train_step=args.train_step)
    student, teacher, teacher_without_ddp = pretrain.wrap_and_init_teacher(student, teacher, ctx)
    ibot_loss = pretrain.build_loss(args, ctx.device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student), ctx.device.type)
    n = len(batches)
    lr, wd, momentum = np.full(n, 1e-3), np.linspace(0.04, 0.05, n), np.array([0.9, 0.95, 0.99][:n])
    step = iBOTTrainStep.from_args(student, teacher, teacher_without_ddp, ibot_loss, args, ctx)
    torch.manual_seed(seed + 1)  # the drop-path draws of the steps
    record = []
    for it, (images, masks) in enumerate(batches):
        losses = step.train_step(optimizer, images, masks, it, 1, (lr, wd, momentum))[0]
        record.append(dict(
            losses={k: v.detach().clone() for k, v in losses.items()},
            grads={name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None},
            center2=ibot_loss.center2.clone()))
    return record, student, teacher


def assert_same_steps(rec_a, rec_b):
    for step, (a, b) in enumerate(zip(rec_a, rec_b)):
        for k in ("cls", "patch", "loss"):
            torch.testing.assert_close(a["losses"][k], b["losses"][k], rtol=1e-6, atol=0,
                                       msg=lambda m: f"step {step} loss {k}: {m}")
        assert a["grads"].keys() == b["grads"].keys()
        scale = max(g.abs().max().item() for g in b["grads"].values())
        for name in b["grads"]:
            torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-6, atol=1e-7 * scale,
                                       msg=lambda m: f"step {step} grad {name}: {m}")
        torch.testing.assert_close(a["center2"], b["center2"], rtol=1e-6, atol=0)


def assert_same_weights(net_a, net_b, tag):
    pa, pb = dict(net_a.named_parameters()), dict(net_b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pb:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{tag} {name}: {m}")


# ---------------------------------------------------------------------------------------------- flag
def test_flag_default_off_and_parsed():
    assert get_args_parser().parse_args([]).grad_checkpointing is False
    args = make_args("--grad_checkpointing", "true")
    assert args.grad_checkpointing is True
    student, teacher = pretrain.build_networks(args)
    assert student.backbone.grad_checkpointing is True
    assert teacher.backbone.grad_checkpointing is False  # the teacher runs without grad
    student, teacher = pretrain.build_networks(make_args())
    assert student.backbone.grad_checkpointing is False


def test_benchmark_accepts_the_flag():
    """``benchmarks/train_step.py`` takes every main_ibot flag (its parser's parent), this one too."""
    bench = load_repo_file("benchmarks/train_step.py")
    args = bench.get_parser().parse_args(["--grad_checkpointing", "true", "--arch", "vit_tiny"])
    assert args.grad_checkpointing is True
    assert bench.get_parser().parse_args([]).grad_checkpointing is False


# ---------------------------------------------------------------------------------------------- training steps
@pytest.mark.parametrize("step_kind", ["fast", "reference"])
def test_vit_steps_equal_with_checkpointing(step_kind):
    """Two train_steps with drop-path: same loss terms, gradients of every student parameter, centre,
    student weights and EMA teacher with and without checkpointing."""
    batches = make_batches(2)
    rec_c, s_c, t_c = run_steps(make_args("--grad_checkpointing", "true", train_step=step_kind),
                                copy.deepcopy(batches))
    rec_p, s_p, t_p = run_steps(make_args(train_step=step_kind), copy.deepcopy(batches))
    assert unwrap(s_c).backbone.grad_checkpointing and not unwrap(s_p).backbone.grad_checkpointing
    assert_same_steps(rec_c, rec_p)
    assert_same_weights(s_c, s_p, "student")
    assert_same_weights(t_c, t_p, "teacher")
    assert s_c.state_dict().keys() == s_p.state_dict().keys()


def test_drop_path_replay_matters(monkeypatch):
    """Negative control: without the RNG replay the recomputed drop-path differs and the gradients
    no longer match, so the equality above does test the replay."""
    batches = make_batches(1)
    rec_p, _, _ = run_steps(make_args(), copy.deepcopy(batches))
    monkeypatch.setattr(vit_mod, "checkpoint", partial(checkpoint, preserve_rng_state=False))
    rec_c, _, _ = run_steps(make_args("--grad_checkpointing", "true"), copy.deepcopy(batches))
    torch.testing.assert_close(rec_c[0]["losses"]["loss"], rec_p[0]["losses"]["loss"], rtol=1e-6, atol=0)
    with pytest.raises(AssertionError):
        assert_same_steps(rec_c, rec_p)


def test_blocks_recomputed_in_backward():
    """With checkpointing each student block runs twice per forward+backward (forward, then the
    recomputation), the teacher's once; the saved activations shrink."""
    args = make_args("--grad_checkpointing", "true")
    torch.manual_seed(0)
    student, _ = pretrain.build_networks(args)
    calls = []
    for i, blk in enumerate(student.backbone.blocks):  # (forward hooks are not run by the recomputation)
        blk.forward = partial(lambda fwd, i, *a, **k: calls.append(i) or fwd(*a, **k), blk.forward, i)
    images, masks = make_batches(1)[0]

    def saved_bytes(enable):
        student.backbone.set_grad_checkpointing(enable)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = student.backbone(images[0], mask=masks[0])
        calls.clear()
        out.square().mean().backward()
        return total[0], len(calls)

    plain, recomputed_plain = saved_bytes(False)
    ckpt, recomputed_ckpt = saved_bytes(True)
    assert recomputed_plain == 0
    assert recomputed_ckpt == len(student.backbone.blocks)
    assert ckpt < 0.5 * plain, (ckpt, plain)


# ---------------------------------------------------------------------------------------------- model level
def test_vit_state_dict_and_eval_paths_unchanged(monkeypatch):
    """Same state-dict keys; the attention / intermediate-layer helpers and no-grad forwards never
    checkpoint."""
    torch.manual_seed(0)
    m = vit_ckpt_test(img_size=32, masked_im_modeling=True)
    keys = list(m.state_dict().keys())
    assert m.set_grad_checkpointing() is m and m.grad_checkpointing
    assert list(m.state_dict().keys()) == keys

    def forbidden(*a, **k):
        raise AssertionError("checkpoint called")
    monkeypatch.setattr(vit_mod, "checkpoint", forbidden)
    x = torch.randn(2, 3, 32, 32)
    m.get_last_selfattention(x)
    m.get_intermediate_layers(x, n=2)
    with torch.no_grad():
        m(x, mask=torch.zeros(2, *GRID, dtype=torch.bool))
    with pytest.raises(AssertionError, match="checkpoint called"):
        m(x, mask=torch.zeros(2, *GRID, dtype=torch.bool))


def _tiny_swin(**kwargs):
    """Two stages (8x8 grid with shifted 4x4 windows, then 4x4), dim 24, drop-path rate 0.4."""
    return SwinTransformer(img_size=32, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, drop_path_rate=0.4, return_all_tokens=True,
                           masked_im_modeling=True, **kwargs)


def test_swin_checkpointing_same_values_and_gradients(monkeypatch):
    """Swin: forward + backward with drop-path give the same output and parameter gradients with and
    without checkpointing; state-dict keys unchanged; eval helpers never checkpoint."""
    torch.manual_seed(0)
    plain = _tiny_swin().train()
    ckpt = copy.deepcopy(plain).set_grad_checkpointing(True)
    assert list(ckpt.state_dict().keys()) == list(plain.state_dict().keys())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    mask = torch.rand(4, 4, 4, generator=g) < 0.4  # final-stage grid of this 2-stage model
    results = []
    for model in (ckpt, plain):
        torch.manual_seed(5)
        out = model(x, mask=mask)
        (out.square().mean() + out[:, 0].sum()).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_c, grads_c), (out_p, grads_p) = results
    torch.testing.assert_close(out_c, out_p, rtol=1e-6, atol=0)
    assert grads_c.keys() == grads_p.keys() and len(grads_p) > 0
    scale = max(t.abs().max().item() for t in grads_p.values())
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-6, atol=1e-7 * scale,
                                   msg=lambda m: f"{name}: {m}")

    def forbidden(*a, **k):
        raise AssertionError("checkpoint called")
    monkeypatch.setattr(swin_mod, "checkpoint", forbidden)
    ckpt.get_last_selfattention(x)
    ckpt.get_intermediate_layers(x, n=3)
    with torch.no_grad():
        ckpt(x, mask=mask)
