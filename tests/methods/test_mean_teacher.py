"""Mean teacher: the teacher is what is evaluated, the consistency is a softmax-MSE between the
student's strong view and the teacher's weak view, and gradients reach the student only."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.methods import Batch
from semiseg.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from semiseg.models import create_model

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(**params) -> MeanTeacher:
    torch.manual_seed(0)
    model = create_model("unet", 1, K, base_channels=4, depth=2)
    model.train()
    return MeanTeacher(model, MeanTeacherConfig(**params), K)


def unlabeled(seed: int = 0, same_views: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, 1, 16, 16, generator=g)
    strong = u.clone() if same_views else 0.5 * u + 0.5 * torch.randn(2, 1, 16, 16, generator=g)
    return Batch(u, strong, None, torch.arange(2))


def labeled(seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 1, 16, 16, generator=g)
    return Batch(img, img, torch.randint(0, K, (2, 16, 16), generator=g), torch.arange(2))


def train_one_step(method: MeanTeacher, step: int = 10) -> None:
    out = method.training_step(labeled(), unlabeled(), step)
    out.loss.backward()
    torch.optim.SGD(method.model.parameters(), lr=0.5).step()
    method.model.zero_grad(set_to_none=True)
    method.after_optimizer_step(step)


def test_eval_model_is_the_teacher() -> None:
    method = build()
    assert method.eval_model() is method.teacher
    assert method.eval_model() is not method.model
    assert all(not p.requires_grad for p in method.eval_model().parameters())
    student_ptrs = {p.data_ptr() for p in method.model.parameters()}
    assert not any(p.data_ptr() in student_ptrs for p in method.eval_model().parameters())
    # after a step at which the EMA averages (a = 0.99), the evaluated weights are the
    # teacher's average, not the student's
    before = [p.clone() for p in method.teacher.parameters()]
    train_one_step(method, step=1000)
    for t, b, s in zip(method.eval_model().parameters(), before, method.model.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s.detach())
    assert any(not torch.equal(t, s) for t, s in zip(method.eval_model().parameters(),
                                                      method.model.parameters()))


def test_consistency_zero_for_identical_models_and_views() -> None:
    method = build()  # the teacher starts as an exact copy of the student
    loss = method.unlabeled_loss(unlabeled(same_views=True), step=1000)
    assert loss.item() == 0.0


def test_consistency_nonzero_for_different_views() -> None:
    method = build()
    assert method.unlabeled_loss(unlabeled(), step=1000).item() > 0


def test_consistency_nonzero_for_different_weights() -> None:
    method = build()
    train_one_step(method, step=1000)  # the student moves away from the averaged teacher
    assert method.unlabeled_loss(unlabeled(same_views=True), step=1000).item() > 0


def test_consistency_value_and_ramp() -> None:
    method = build(consistency_weight=0.3, rampup_fraction=0.2)  # 200 of the default 1000 steps
    assert method.total_steps == 1000
    batch = unlabeled()
    student = method.model(batch.strong)
    loss, label = method.consistency(student, batch, step=100)
    with torch.no_grad():
        method.teacher.train()
        target = method.teacher(batch.image).softmax(1)
    ramp = math.exp(-5 * 0.5 ** 2)
    expected = 0.3 * ramp * ((student.detach().softmax(1) - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(label, target.argmax(1))  # the teacher's labels on the weak view


def test_gradient_reaches_the_student_only() -> None:
    method = build()
    train_one_step(method, step=3)
    loss = method.unlabeled_loss(unlabeled(5), step=1000)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    grads = [p.grad for p in method.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_training_step_reports_teacher_labels_on_every_pixel() -> None:
    method = build()
    batch = unlabeled()
    out = method.training_step(labeled(), batch, step=0)
    assert out.pseudo_used is None  # soft targets on every pixel
    with torch.no_grad():
        method.teacher.train()
        expected = method.teacher(batch.image).argmax(1)
    assert torch.equal(out.pseudo_label, expected)
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
