"""iBOTLoss against the official numbers (loss_cases.pt) through both entry points."""
import pytest
import torch

from ibot.train.loss import iBOTLoss, masked_token_weights, teacher_temperature_schedules
from official_fixtures import fixture_path

CASES = torch.load(fixture_path("loss_cases.pt"), weights_only=True)


def _run_dense(loss, step, epoch):
    i = step["inputs"]
    return loss((i["student_cls"], i["student_patch"]), (i["teacher_cls"], i["teacher_patch"]),
                i["student_local_cls"], step["masks"], epoch)


def _run_masked(loss, step, epoch, ngcrops):
    i = step["inputs"]
    index, weight = masked_token_weights(torch.cat(step["masks"][:ngcrops]))
    kp = i["student_patch"].shape[-1]
    return loss.forward_masked(i["student_cls"], i["student_local_cls"], i["student_patch"].reshape(-1, kp)[index],
                               i["teacher_cls"], i["teacher_patch"].reshape(-1, kp)[index],
                               i["teacher_patch"].mean(1), weight, epoch)


@pytest.mark.parametrize("path", ["dense", "masked"])
@pytest.mark.parametrize("case_id", range(len(CASES)))
def test_loss_reproduces_official_steps(case_id, path):
    case = CASES[case_id]
    loss = iBOTLoss(**case["ctor"])
    assert loss.teacher_temp_schedule.tolist() == pytest.approx(case["teacher_temp_schedule"], abs=1e-12)
    assert loss.teacher_temp2_schedule.tolist() == pytest.approx(case["teacher_temp2_schedule"], abs=1e-12)
    for step in case["steps"]:  # consecutive calls on one object: checks the centre updates too
        if path == "dense":
            out = _run_dense(loss, step, case["epoch"])
        else:
            out = _run_masked(loss, step, case["epoch"], case["ctor"]["ngcrops"])
        assert list(out) == ["cls", "patch", "loss"]
        for key in ("cls", "patch", "loss"):
            assert out[key].item() == pytest.approx(step["expected"][key], rel=1e-5)
        torch.testing.assert_close(loss.center, step["expected"]["center"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss.center2, step["expected"]["center2"], rtol=1e-5, atol=1e-7)


def test_masked_path_gradients_equal_dense():
    """Gradients w.r.t. student logits agree, including images without any masked token."""
    torch.manual_seed(0)
    ng, b, np_, k = 2, 3, 9, 16
    s_cls = torch.randn(ng * b, k, requires_grad=True)
    s_patch = torch.randn(ng * b, np_, k, requires_grad=True)
    t_cls, t_patch = torch.randn(ng * b, k), torch.randn(ng * b, np_, k)
    masks = [torch.rand(b, 3, 3) < 0.4 for _ in range(ng)]
    masks[0][0] = False       # an image with no masked token
    masks[1][1] = True        # an image with every token masked
    ctor = dict(out_dim=k, patch_out_dim=k, ngcrops=ng, nlcrops=0, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp2=0.04, teacher_temp2=0.07, warmup_teacher_temp_epochs=2, nepochs=4)
    dense = iBOTLoss(**ctor)((s_cls, s_patch), (t_cls, t_patch), None, masks, 1)
    g_dense = torch.autograd.grad(dense["loss"], [s_cls, s_patch])
    index, weight = masked_token_weights(torch.cat(masks))
    fast = iBOTLoss(**ctor).forward_masked(s_cls, None, s_patch.reshape(-1, k)[index], t_cls,
                                           t_patch.reshape(-1, k)[index], t_patch.mean(1), weight, 1)
    g_fast = torch.autograd.grad(fast["loss"], [s_cls, s_patch])
    torch.testing.assert_close(fast["loss"], dense["loss"], rtol=1e-6, atol=1e-6)
    for a, b_ in zip(g_fast, g_dense):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-7)


def test_masked_token_weights():
    masks = torch.tensor([[[True, False], [True, True]], [[False, False], [False, False]]])
    index, weight = masked_token_weights(masks)
    assert index.tolist() == [0, 2, 3]
    assert weight.tolist() == pytest.approx([1 / 3] * 3)


def test_temperature_schedule_shift_and_validation():
    cls, patch = teacher_temperature_schedules(0.04, 0.07, 0.04, 0.07, 30, 300, mim_start_epoch=50)
    assert patch[:50].tolist() == [0.04] * 50 and patch[79] == pytest.approx(0.07) and patch[80:].min() == 0.07
    assert cls[29] == pytest.approx(0.07)
    with pytest.raises(ValueError, match="--epochs"):
        teacher_temperature_schedules(0.04, 0.07, 0.04, 0.07, 30, 40, mim_start_epoch=20)


def test_needs_two_global_crops():
    with pytest.raises(ValueError, match="--global_crops_number"):
        iBOTLoss(8, 8, 1, 2, 0.04, 0.04, 0.04, 0.07, 1, 2)


def test_koleo_loss_value_and_direction():
    """KoLeoLoss = mean over rows of -log(distance to the nearest other row) of L2-normalised rows
    (DINOv2); it is larger for concentrated features and its gradient spreads them."""
    from ibot.train.loss import KoLeoLoss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    xn = torch.nn.functional.normalize(x, dim=1)
    dist = torch.cdist(xn, xn)
    dist.fill_diagonal_(float("inf"))
    expected = -torch.log(dist.min(dim=1).values).mean()
    koleo = KoLeoLoss()
    torch.testing.assert_close(koleo(x), expected, rtol=1e-5, atol=1e-6)
    concentrated = (torch.randn(1, 8, generator=g) + 0.01 * torch.randn(16, 8, generator=g)).requires_grad_()
    value = koleo(concentrated)
    assert value.item() > koleo(x).item() + 3
    value.backward()
    with torch.no_grad():
        assert koleo(concentrated - 0.1 * concentrated.grad).item() < value.item()
    assert koleo(x.to(torch.bfloat16)).dtype == torch.float32
