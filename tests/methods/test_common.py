"""Shared method pieces: the EMA teacher update, the sigmoid ramp-up, masked cross-entropy and
the joint forward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.methods.common import (
    confidence_mask, ema_update, joint_forward, make_teacher, masked_cross_entropy, sigmoid_rampup,
)
from semiseg.models import create_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))


def params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def test_make_teacher_is_a_frozen_copy() -> None:
    student = small_net(0)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()


def test_ema_step_zero_copies_the_student() -> None:
    """a = min(1 - 1/1, decay) = 0 at step 0: the teacher becomes the student."""
    teacher, student = make_teacher(small_net(0)), small_net(1)
    assert not all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    ema_update(teacher, student, decay=0.99, step=0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


@pytest.mark.parametrize("step, decay, alpha", [
    (3, 0.99, 0.75),        # warm-up: 1 - 1/4 < decay
    (9, 0.99, 0.9),         # warm-up: 1 - 1/10
    (10_000, 0.99, 0.99),   # late: a = decay
    (10_000, 0.5, 0.5),
])
def test_ema_formula(step: int, decay: float, alpha: float) -> None:
    teacher, student = make_teacher(small_net(0)), small_net(1)
    t0, s0 = params(teacher), params(student)
    ema_update(teacher, student, decay=decay, step=step)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        torch.testing.assert_close(t, alpha * a + (1 - alpha) * b, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(x, y) for x, y in zip(params(student), s0))  # student untouched


def test_ema_copies_buffers() -> None:
    teacher, student = make_teacher(small_net(0)), small_net(1)
    student.train()
    with torch.no_grad():
        for _ in range(3):
            student(torch.randn(4, 1, 8, 8) * 3 + 1)  # moves the BatchNorm running statistics
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)
    ema_update(teacher, student, decay=0.99, step=10_000)
    for (name, t), (_, s) in zip(teacher.named_buffers(), student.named_buffers()):
        assert torch.equal(t, s), name
    assert teacher[1].num_batches_tracked.item() == 3


def test_ema_unwraps_a_ddp_like_wrapper() -> None:
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    teacher, student = make_teacher(small_net(0)), small_net(1)
    ema_update(teacher, Wrapper(student), decay=0.99, step=0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(-10, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp-up
    values = [sigmoid_rampup(s, 100) for s in range(0, 101, 10)]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_masked_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    mask = torch.rand(2, 5, 6, generator=g) < 0.3
    assert 0 < mask.sum() < mask.numel()
    expected = F.cross_entropy(logits[:, :, None].permute(0, 2, 3, 4, 1)[mask[:, None]].view(-1, 4),
                               target[mask]) * mask.float().mean()
    got = masked_cross_entropy(logits, target, mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # per-pixel reference, written out
    per_pixel = -logits.log_softmax(1).gather(1, target[:, None])[:, 0]
    assert got.item() == pytest.approx((per_pixel[mask].sum() / mask.numel()).item(), rel=1e-5)
    # full mask: the plain mean cross-entropy; empty mask: exactly 0
    full = masked_cross_entropy(logits, target, torch.ones_like(mask))
    assert full.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    empty = masked_cross_entropy(logits, target, torch.zeros_like(mask))
    assert empty.item() == 0.0


def test_masked_cross_entropy_gradient_only_through_masked_pixels() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    masked_cross_entropy(logits, target, mask).backward()
    nonzero = logits.grad.abs().sum(1)[0] > 0
    assert nonzero.tolist() == mask[0].tolist()


def test_confidence_mask() -> None:
    probs = torch.tensor([[0.5, 0.25], [0.5, 0.75]])[None, :, None, :]  # (1, 2, 1, 2)
    conf, label, keep = confidence_mask(probs, 0.6)
    assert conf[0, 0].tolist() == [0.5, 0.75]
    assert label[0, 0].tolist() == [0, 1]
    assert keep[0, 0].tolist() == [False, True]
    assert confidence_mask(probs, 0.75)[2][0, 0].tolist() == [False, True]  # >= threshold


def test_joint_forward_splits_match_separate_forwards() -> None:
    torch.manual_seed(0)
    model = create_model("unet", 1, 3, base_channels=4, depth=2)
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(torch.randn(4, 1, 16, 16) * 2 + 1)
    model.eval()
    a, b = torch.randn(3, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        la, lb = joint_forward(model, a, b)
        assert la.shape == (3, 3, 16, 16) and lb.shape == (2, 3, 16, 16)
        torch.testing.assert_close(la, model(a), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lb, model(b), rtol=1e-5, atol=1e-6)
        la2, lb2, fa, fb = joint_forward(model, a, b, features=True)
        torch.testing.assert_close(la2, la)
        torch.testing.assert_close(lb2, lb)
        ra, rfa = model(a, return_features=True)
        rb, rfb = model(b, return_features=True)
        torch.testing.assert_close(fa, rfa, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fb, rfb, rtol=1e-5, atol=1e-6)
        assert fa.shape == (3, 4, 16, 16) and fb.shape == (2, 4, 16, 16)
