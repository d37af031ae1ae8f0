"""Low-confidence consistency and class separation: the tau mask at its extremes and on
hand-made probabilities, class means and the prototype EMA on hand-built features."""

from __future__ import annotations

import pytest
import torch

from semiseg.methods import Batch
from semiseg.methods.low_confidence import (
    LowConfidence, LowConfidenceConfig, class_means, low_confidence_mask,
)
from semiseg.models import create_model

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def batches(seed: int = 0) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 1, 16, 16, generator=g)
    labeled = Batch(img, img + 0.1, torch.randint(0, K, (2, 16, 16), generator=g), torch.arange(2))
    u = torch.randn(2, 1, 16, 16, generator=g)
    strong = 0.6 * u + 0.3 * torch.randn(2, 1, 16, 16, generator=g)
    return labeled, Batch(u, strong, None, torch.arange(2, 4))


def warmed_up(**params) -> tuple[LowConfidence, Batch]:
    """A method after one ordinary training step and optimizer/EMA update (teacher != student)."""
    torch.manual_seed(0)
    model = create_model("unet", 1, K, base_channels=4, depth=2)
    model.train()
    method = LowConfidence(model, LowConfidenceConfig(**params), K)
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, 0)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    method.after_optimizer_step(5)
    model.zero_grad(set_to_none=True)
    return method, batches(1)[1]


def teacher_probs(method: LowConfidence, unlabeled: Batch) -> torch.Tensor:
    with torch.no_grad():
        method.teacher.train()
        return method.teacher(unlabeled.image).float().softmax(1)


def test_tau_zero_drops_every_pixel_and_both_terms_are_exactly_zero() -> None:
    method, unlabeled = warmed_up(threshold=0.0)
    logits_u, feats_u = method.model(unlabeled.strong, return_features=True)
    consistency, separation, low, t_label = method.unlabeled_terms(logits_u, feats_u, unlabeled,
                                                                   step=1000)
    assert low.shape == (2, 16, 16) and not low.any()
    assert consistency.item() == 0.0
    assert separation.item() == 0.0
    assert torch.equal(t_label, teacher_probs(method, unlabeled).argmax(1))
    assert method.unlabeled_loss(unlabeled, step=1000).item() == 0.0


def test_tau_one_keeps_every_pixel() -> None:
    method, unlabeled = warmed_up(threshold=1.0)
    protos = method.prototypes.clone()
    logits_u, feats_u = method.model(unlabeled.strong, return_features=True)
    consistency, separation, low, _ = method.unlabeled_terms(logits_u, feats_u, unlabeled, step=1000)
    assert low.all()
    assert consistency.item() > 0 and separation.item() > 0
    # no pixel is confident, so the unlabeled images leave the prototypes alone
    assert torch.equal(method.prototypes, protos)
    # consistency = weight * ramp * mean over pixels of sum_c (p_student - p_teacher)^2
    t = teacher_probs(method, unlabeled)
    ramp = torch.exp(torch.tensor(-5.0 * (1 - 1.0) ** 2)).item()  # step 1000 = rampup_fraction 1.0 x total_steps 1000
    expected = 0.1 * ramp * ((logits_u.detach().softmax(1) - t) ** 2).sum(1).mean()
    assert consistency.item() == pytest.approx(expected.item(), rel=1e-5)


def test_intermediate_tau_counts_only_low_confidence_pixels() -> None:
    method, unlabeled = warmed_up()
    t = teacher_probs(method, unlabeled)
    tau = float(t.max(1).values.median())  # about half the pixels on each side
    method.cfg.threshold = tau
    logits_u, feats_u = method.model(unlabeled.strong, return_features=True)
    consistency, _, low, _ = method.unlabeled_terms(logits_u, feats_u, unlabeled, step=1000)
    assert torch.equal(low, t.max(1).values < tau)
    assert 0 < low.float().mean() < 1
    sq = ((logits_u.detach().softmax(1) - t) ** 2).sum(1)
    expected = 0.1 * (sq * low).sum() / low.numel()
    assert consistency.item() == pytest.approx(expected.item(), rel=1e-5)


def test_low_confidence_mask_on_hand_made_probabilities() -> None:
    # max probabilities per pixel: 0.5, 0.75, 0.875, 1.0 (exact in binary)
    probs = torch.tensor([[0.5, 0.25, 0.0, 0.0],
                          [0.25, 0.75, 0.125, 1.0],
                          [0.25, 0.0, 0.875, 0.0]])[None, :, None, :]  # (1, 3, 1, 4)
    assert torch.allclose(probs.sum(1), torch.ones(1, 1, 4))
    mask = lambda tau: low_confidence_mask(probs, tau)[0, 0].tolist()  # noqa: E731
    assert mask(0.0) == [False, False, False, False]
    assert mask(0.5) == [False, False, False, False]   # >= tau is dropped
    assert mask(0.75) == [True, False, False, False]
    assert mask(0.9) == [True, True, True, False]
    assert mask(1.0) == [True, True, True, True]       # tau >= 1: every pixel, even p = 1
    assert mask(1.5) == [True, True, True, True]
    assert low_confidence_mask(probs, 0.8).shape == (1, 1, 4)
    assert low_confidence_mask(probs, 0.8).dtype == torch.bool


# pixel features (1, 2, 1, 5): (1,0), (0,2), (3,4), (5,0), (0,-1); normalised
# (1,0), (0,1), (0.6,0.8), (1,0), (0,-1)
FEATS = torch.tensor([[1.0, 0.0, 3.0, 5.0, 0.0], [0.0, 2.0, 4.0, 0.0, -1.0]])[None, :, None, :]
LABELS = torch.tensor([[[0, 0, 2, 2, 3]]])
MASK = torch.tensor([[[True, True, True, True, False]]])


def test_class_means_on_hand_built_case() -> None:
    means, present = class_means(FEATS, LABELS, MASK, num_classes=4)
    assert present.tolist() == [True, False, True, False]  # class 3 only at a masked-out pixel
    expected = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.8, 0.4], [0.0, 0.0]])
    torch.testing.assert_close(means, expected)
    means, present = class_means(FEATS, LABELS, torch.ones_like(MASK), num_classes=4)
    assert present.tolist() == [True, False, True, True]
    torch.testing.assert_close(means[3], torch.tensor([0.0, -1.0]))


def test_prototype_ema_on_present_classes_only() -> None:
    torch.manual_seed(0)
    model = create_model("unet", 1, 4, base_channels=2, depth=1)
    method = LowConfidence(model, LowConfidenceConfig(prototype_momentum=0.75), 4)
    # the first update sets the prototypes to the class means
    method.update_prototypes(FEATS, LABELS, MASK)
    first, _ = class_means(FEATS, LABELS, MASK, 4)
    torch.testing.assert_close(method.prototypes, first)

    old = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    method.prototypes = old.clone()
    method.update_prototypes(FEATS, LABELS, MASK)
    new, _ = class_means(FEATS, LABELS, MASK, 4)
    expected = old.clone()
    for c in (0, 2):  # present
        expected[c] = 0.75 * old[c] + 0.25 * new[c]
    torch.testing.assert_close(method.prototypes, expected)
    assert torch.equal(method.prototypes[1], old[1]) and torch.equal(method.prototypes[3], old[3])


def test_tau_zero_updates_prototypes_from_confident_unlabeled_pixels() -> None:
    method, unlabeled = warmed_up(threshold=0.0)
    before = method.prototypes.clone()
    logits_u, feats_u = method.model(unlabeled.strong, return_features=True)
    _, _, _, t_label = method.unlabeled_terms(logits_u, feats_u, unlabeled, step=1000)
    means, present = class_means(feats_u, t_label, torch.ones_like(t_label, dtype=torch.bool), K)
    expected = before.clone()
    expected[present] = 0.9 * before[present] + 0.1 * means[present]
    torch.testing.assert_close(method.prototypes, expected)
    assert not method.prototypes.requires_grad
