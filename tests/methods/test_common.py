"""Shared method pieces: the EMA teacher update, the sigmoid ramp-up, masked cross-entropy and
the joint forward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.methods.common import (
    check_decays, check_fractions, check_range, check_weights, confidence_mask, ema_update,
    joint_forward, make_teacher, masked_cross_entropy, schedule_rampup, sigmoid_rampup,
)
from semiseg.errors import ConfigError
from semiseg.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def test_ema_leaves_buffers_to_the_teacher() -> None:
    """Parameters-only EMA: the student's BatchNorm statistics are not copied; the teacher's
    stay what its own passes made them (here: none yet, so the initial ones)."""
    teacher, student = make_teacher(small_net(0)), small_net(1)
    own = {name: b.clone() for name, b in teacher.named_buffers()}
    student.train()
    with torch.no_grad():
        for _ in range(3):
            student(torch.randn(4, 1, 8, 8) * 3 + 1)  # moves the BatchNorm running statistics
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)
    ema_update(teacher, student, decay=0.99, step=10_000)
    for name, b in teacher.named_buffers():
        assert torch.equal(b, own[name]), name
    assert teacher[1].num_batches_tracked.item() == 0


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


def test_schedule_rampup_is_relative_to_the_run() -> None:
    """The same fraction of a short and a long run gives the same weight."""
    for step, total in [(30, 300), (3000, 30_000)]:
        assert schedule_rampup(step, 0.5, total) == pytest.approx(math.exp(-5 * 0.8 ** 2))
    assert schedule_rampup(150, 0.5, 300) == 1.0
    assert schedule_rampup(0, 0.0, 300) == 1.0  # no ramp-up
    assert schedule_rampup(29_999, 1.0, 30_000) == pytest.approx(math.exp(-5 * (1 / 30_000) ** 2))


@dataclass
class Params:
    k: int = 1
    weight: float = 0.0
    threshold: float = 1.0
    decay: float = 0.0
    temperature: float = 0.1


@pytest.mark.parametrize("field, value, check, message", [
    ("k", 0, lambda c: check_range(c, "k", 1, integer=True),
     "method.params.k=0: expected an integer >= 1"),
    ("weight", -1.0, lambda c: check_weights(c, "weight"),
     "method.params.weight=-1.0: expected a value >= 0"),
    ("threshold", 1.5, lambda c: check_fractions(c, "threshold"),
     "method.params.threshold=1.5: expected a value in [0, 1]"),
    ("decay", 1.0, lambda c: check_decays(c, "decay"),
     "method.params.decay=1.0: expected a value in [0, 1)"),
    ("temperature", 0.0, lambda c: check_range(c, "temperature", 0, low_open=True),
     "method.params.temperature=0.0: expected a value > 0"),
    ("weight", math.nan, lambda c: check_weights(c, "weight"),
     "method.params.weight=nan: expected a value >= 0"),
])
def test_range_checks_name_key_value_and_range(field, value, check, message) -> None:
    check(Params())  # the defaults pass, including the closed ends (k=1, threshold=1, decay=0)
    with pytest.raises(ConfigError) as err:
        check(Params(**{field: value}))
    assert str(err.value) == message


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
