"""Low-confidence consistency and class separation: the tau mask and schedule on hand-made
values, that each loss counts exactly the pixels its mask claims under both normalisations, the
reduction to mean_teacher, and class means and the prototype EMA on hand-built features."""

from __future__ import annotations

import copy

import pytest
import torch

from semiseg.errors import ConfigError
from semiseg.methods import Batch
from semiseg.methods.low_confidence import (
    LowConfidence, LowConfidenceConfig, class_means, low_confidence_mask, threshold_at,
)
from semiseg.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
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


def student(method: LowConfidence, unlabeled: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return method.model(unlabeled.strong, return_features=True)


def test_threshold_schedule_interpolates_the_margin_geometrically() -> None:
    assert threshold_at(0.8, 0.999, 0.0) == 0.8
    assert threshold_at(0.8, 0.999, 1.0) == 0.999
    assert threshold_at(0.8, 0.999, 0.5) == pytest.approx(1 - (0.2 * 0.001) ** 0.5)
    assert threshold_at(0.8, 0.999, -1.0) == 0.8 and threshold_at(0.8, 0.999, 7.0) == 0.999
    assert threshold_at(0.8, 0.8, 0.3) == 0.8  # threshold_final = threshold: the fixed tau
    taus = [threshold_at(0.8, 0.999, t / 10) for t in range(11)]
    assert taus == sorted(taus)
    method = LowConfidence(create_model("unet", 1, K, base_channels=2, depth=1),
                           LowConfidenceConfig(threshold=0.5, threshold_final=0.875), K,
                           total_steps=200)
    assert method.threshold(0) == 0.5 and method.threshold(200) == 0.875
    assert method.threshold(100) == pytest.approx(0.75)  # margins 0.5, 0.25, 0.125


@pytest.mark.parametrize("params, match", [
    ({"threshold_final": 0.5}, r"threshold_final=0\.5: expected a value in \[0\.8, 1\)"),
    ({"threshold_final": 1.0}, r"threshold_final=1\.0: expected a value in \[0\.8, 1\)"),
    ({"consistency_norm": "mean"}, r"consistency_norm='mean': expected one of 'low', 'all'"),
    ({"separation_norm": None}, "separation_norm=None"),
    ({"separation_weight": -1.0}, "separation_weight"),
    ({"temperature": 0.0}, "temperature"),
])
def test_config_refuses_out_of_range_values(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LowConfidenceConfig(**params)
    LowConfidenceConfig(threshold=1.0, threshold_final=1.0)  # every pixel, all run long


def test_tau_zero_drops_every_pixel_and_both_terms_are_exactly_zero() -> None:
    method, unlabeled = warmed_up(threshold=0.0, threshold_final=0.0)
    terms = method.unlabeled_terms(*student(method, unlabeled), unlabeled, step=1000)
    assert terms.low.shape == (2, 16, 16) and not terms.low.any()
    assert terms.consistency.item() == 0.0 and terms.separation.item() == 0.0
    assert torch.equal(terms.teacher_label, teacher_probs(method, unlabeled).argmax(1))
    assert method.unlabeled_loss(unlabeled, step=1000).item() == 0.0


def test_tau_one_keeps_every_pixel_and_leaves_the_prototypes_alone() -> None:
    method, unlabeled = warmed_up(threshold=1.0, threshold_final=1.0)
    protos = method.prototypes.clone()
    terms = method.unlabeled_terms(*student(method, unlabeled), unlabeled, step=1000)
    assert terms.low.all()
    assert terms.consistency.item() > 0 and terms.separation.item() > 0
    assert torch.equal(method.prototypes, protos)  # no pixel is confident


def test_each_loss_counts_exactly_the_pixels_below_tau_under_both_norms() -> None:
    method, unlabeled = warmed_up()
    t = teacher_probs(method, unlabeled)
    tau = float(t.max(1).values.median())  # about half the pixels on each side
    method.cfg.threshold = method.cfg.threshold_final = tau
    other = copy.deepcopy(method)
    other.cfg = LowConfidenceConfig(threshold=tau, threshold_final=tau, consistency_norm="all",
                                    separation_norm="all")
    logits_u, feats_u = student(method, unlabeled)
    low_terms = method.unlabeled_terms(logits_u, feats_u, unlabeled, step=1000)
    all_terms = other.unlabeled_terms(logits_u, feats_u, unlabeled, step=1000)

    low = t.max(1).values < tau
    assert torch.equal(low_terms.low, low) and torch.equal(all_terms.low, low)
    n_low, n_all = int(low.sum()), low.numel()
    assert 0 < n_low < n_all
    sq = ((logits_u.detach().softmax(1) - t) ** 2).mean(1)  # ramp = 1 at step 1000 of 1000
    total = 0.1 * sq[low].sum().item()
    assert low_terms.consistency.item() == pytest.approx(total / n_low, rel=1e-5)
    assert all_terms.consistency.item() == pytest.approx(total / n_all, rel=1e-5)
    # the same per-pixel separation sum, divided by the low-confidence or by all pixels
    ratio = all_terms.separation.item() / low_terms.separation.item()
    assert ratio == pytest.approx(n_low / n_all, rel=1e-5)
    # the prototypes took their step from the confident pixels: what a mask-only change can alter
    assert torch.equal(method.prototypes, other.prototypes)


def test_training_step_logs_tau_and_coverage_of_the_pixels_it_used() -> None:
    torch.manual_seed(0)
    model = create_model("unet", 1, K, base_channels=4, depth=2)
    method = LowConfidence(model, LowConfidenceConfig(threshold=0.5, threshold_final=0.875), K,
                           total_steps=200)
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, 100)
    assert out.logs["threshold"] == pytest.approx(0.75)
    assert torch.equal(out.pseudo_used, teacher_probs(method, unlabeled).max(1).values < 0.75)
    assert out.logs["low_conf_ratio"] == pytest.approx(out.pseudo_used.float().mean().item())
    assert out.logs["loss_unsup"] == pytest.approx(
        out.logs["loss_consistency"] + out.logs["loss_separation"])


def test_tau_one_with_norm_all_and_no_separation_is_mean_teachers_consistency() -> None:
    method, unlabeled = warmed_up(threshold=1.0, threshold_final=1.0, consistency_norm="all",
                                  separation_weight=0.0)
    mt = MeanTeacher(method.model, MeanTeacherConfig(), K)
    mt.teacher.load_state_dict(method.teacher.state_dict())
    logits_u = method.model(unlabeled.strong)
    expected, _ = mt.consistency(logits_u, unlabeled, step=700)
    loss = method.unlabeled_loss(unlabeled, step=700)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


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


def test_prototype_ema_on_seen_classes_and_first_mean_sets_a_new_class() -> None:
    torch.manual_seed(0)
    model = create_model("unet", 1, 4, base_channels=2, depth=1)
    method = LowConfidence(model, LowConfidenceConfig(prototype_momentum=0.75), 4)
    method.update_prototypes(FEATS, LABELS, MASK)  # the first update sets the class means
    first, _ = class_means(FEATS, LABELS, MASK, 4)
    torch.testing.assert_close(method.prototypes, first)
    assert method.seen.tolist() == [True, False, True, False]

    old = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    method.prototypes = old.clone()
    method.update_prototypes(FEATS, LABELS, torch.ones_like(MASK))  # class 3 appears
    new, _ = class_means(FEATS, LABELS, torch.ones_like(MASK), 4)
    expected = old.clone()
    for c in (0, 2):  # seen before: an EMA step
        expected[c] = 0.75 * old[c] + 0.25 * new[c]
    expected[3] = new[3]  # first seen: set
    torch.testing.assert_close(method.prototypes, expected)
    assert torch.equal(method.prototypes[1], old[1])  # absent: unchanged
    assert method.seen.tolist() == [True, False, True, True]


def test_one_prototype_step_from_labeled_and_confident_unlabeled_pixels() -> None:
    method, unlabeled = warmed_up()
    tau = float(teacher_probs(method, unlabeled).max(1).values.median())
    method.cfg.threshold = method.cfg.threshold_final = tau
    labeled = batches(2)[0]
    before = method.prototypes.clone()
    assert method.seen.all()
    logits_u, feats_u = student(method, unlabeled)
    feats_l = method.model(labeled.image, return_features=True)[1]
    t = teacher_probs(method, unlabeled)
    terms = method.unlabeled_terms(logits_u, feats_u, unlabeled, step=500,
                                   labeled=(feats_l, labeled.mask))
    confident = t.max(1).values >= tau
    assert torch.equal(confident, ~terms.low) and confident.any()
    means, present = class_means(torch.cat([feats_l, feats_u]),
                                 torch.cat([labeled.mask, t.argmax(1)]),
                                 torch.cat([torch.ones_like(confident), confident]), K)
    expected = before.clone()
    expected[present] = 0.9 * before[present] + 0.1 * means[present]
    torch.testing.assert_close(method.prototypes, expected)
    assert not method.prototypes.requires_grad
