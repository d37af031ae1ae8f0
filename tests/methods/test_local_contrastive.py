"""Local contrastive: the pixel contrastive loss on hand-built embeddings, per-class sampling,
and the self-training rounds (when the pseudo-labeller is refreshed, and that it then holds the
model's weights)."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.methods import Batch
from semiseg.methods.local_contrastive import (
    LocalContrastive, LocalContrastiveConfig, pixel_contrastive_loss, sample_per_class_pixels,
)
from semiseg.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def clustered(per_class: int = 20, classes: int = 3, dim: int = 16, noise: float = 0.05,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = centroids[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_clustered_embeddings_score_lower_than_shuffled_labels() -> None:
    feats, labels = clustered()
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert (shuffled != labels).float().mean() > 0.3
    good = pixel_contrastive_loss(feats, labels, temperature=0.1)
    bad = pixel_contrastive_loss(feats, shuffled, temperature=0.1)
    assert torch.isfinite(good) and torch.isfinite(bad)
    assert good < bad - 1.0, (good, bad)


def test_exact_value_on_orthogonal_clusters() -> None:
    """m identical pixels per class on orthogonal axes: for every anchor the m - 1 positives have
    cosine 1 and the (K - 1) m negatives cosine 0, so the loss is
    -log(e^(1/T) / ((m-1) e^(1/T) + (K-1) m)) = log(m - 1 + (K - 1) m e^(-1/T)).
    The features are scaled per pixel: the loss must not depend on feature length."""
    m, k = 5, 3
    labels = torch.arange(k).repeat_interleave(m)
    feats = torch.eye(4)[labels] * torch.linspace(0.5, 3.0, len(labels))[:, None]
    for t in (0.05, 0.1, 0.5, 1.0):
        expected = math.log(m - 1 + (k - 1) * m * math.exp(-1 / t))
        assert pixel_contrastive_loss(feats, labels, t).item() == pytest.approx(expected, rel=1e-5)


def test_lower_temperature_sharpens() -> None:
    """Lower temperature sharpens the softmax over pixels. With clustered embeddings the loss
    then falls toward its floor, log(#positives) = log(19) here (all the mass on positives,
    shared evenly); with shuffled labels (half the "positives" far away) it rises."""
    feats, labels = clustered(noise=0.02)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    temps = [1.0, 0.5, 0.2, 0.1, 0.05]
    good = [pixel_contrastive_loss(feats, labels, t).item() for t in temps]
    bad = [pixel_contrastive_loss(feats, shuffled, t).item() for t in temps]
    assert all(a > b for a, b in zip(good, good[1:])), good
    assert all(a < b for a, b in zip(bad, bad[1:])), bad
    floor = math.log(20 - 1)
    assert good[-1] == pytest.approx(floor, abs=0.05)
    assert all(v >= floor - 1e-3 for v in good)


def test_no_positives_gives_zero_with_finite_zero_gradient() -> None:
    feats = torch.randn(3, 8, requires_grad=True)
    loss = pixel_contrastive_loss(feats, torch.tensor([0, 1, 2]), temperature=0.1)
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.equal(feats.grad, torch.zeros_like(feats))


def test_single_pixel_and_single_class_edge_cases() -> None:
    one = torch.randn(1, 8, requires_grad=True)
    loss = pixel_contrastive_loss(one, torch.tensor([0]), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(one.grad).all()


def test_anchors_without_positives_are_left_out() -> None:
    """Class 2 has one pixel (no positive): the loss averages over the other anchors only, but
    that pixel still acts as a negative for them; gradients are finite everywhere."""
    feats, labels = clustered(per_class=4, classes=3)
    feats = feats[:9].clone().requires_grad_(True)    # 4 of class 0, 4 of class 1, 1 of class 2
    labels = labels[:9]
    loss = pixel_contrastive_loss(feats, labels, 0.1)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(feats.grad).all()
    assert feats.grad[8].abs().sum() > 0  # the lone pixel is still a negative
    # same value as computed by hand over the 8 anchors with positives
    z = torch.nn.functional.normalize(feats.detach(), dim=1)
    logits = z @ z.T / 0.1
    logits.fill_diagonal_(float("-inf"))
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    per_anchor = [-log_prob[i, [j for j in range(9) if j != i and labels[j] == labels[i]]].mean()
                  for i in range(8)]
    assert loss.item() == pytest.approx(torch.stack(per_anchor).mean().item(), rel=1e-5)


def test_sample_per_class_caps_each_class() -> None:
    labels = torch.cat([torch.zeros(100), torch.ones(10), torch.full((3,), 2)]).long()
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    labels = labels.view(1, 1, len(labels))             # (B, H, W)
    feats = torch.randn(1, 4, 1, labels.shape[-1])
    feats[:, 0] = labels.float() * 1000 + torch.arange(labels.shape[-1]).float()  # label + position
    out, out_labels = sample_per_class_pixels(feats, labels, per_class=8)
    assert torch.bincount(out_labels).tolist() == [8, 8, 3]
    assert out.shape == (19, 4)
    # each row is a real pixel of its class, none drawn twice
    pos = (out[:, 0] % 1000).long()
    assert torch.equal(labels.view(-1)[pos], out_labels)
    assert torch.equal((out[:, 0] // 1000).long(), out_labels)
    assert len(pos.unique()) == len(pos)
    everything, _ = sample_per_class_pixels(feats, labels, per_class=1000)
    assert len(everything) == labels.numel()


def test_sample_per_class_keeps_gradient_path() -> None:
    feats = torch.randn(2, 3, 4, 4, requires_grad=True)
    out, _ = sample_per_class_pixels(feats, torch.randint(0, 2, (2, 4, 4)), 5)
    out.sum().backward()
    assert feats.grad.abs().sum() > 0


# ---- self-training rounds --------------------------------------------------------------------


def build(**params) -> LocalContrastive:
    torch.manual_seed(0)
    model = create_model("unet", 1, 3, base_channels=4, depth=2)
    return LocalContrastive(model, LocalContrastiveConfig(**params), 3)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refresh_schedule_and_labeller_weights() -> None:
    method = build(refresh_epochs=2, rounds=2)
    model = method.model
    assert all(not p.requires_grad for p in method.labeller.parameters())
    refreshed, snapshot = [], None
    for epoch in range(8):
        with torch.no_grad():  # the model "trains" between epochs: every weight moves
            for p in model.parameters():
                p.add_(0.01 * (epoch + 1))
            for name, b in model.named_buffers():
                if b.is_floating_point():
                    b.add_(0.5)
        before = {k: v.clone() for k, v in method.labeller.state_dict().items()}
        method.on_epoch_start(epoch)
        after = method.labeller.state_dict()
        if not states_equal(before, after):
            refreshed.append(epoch)
            # right after a refresh the labeller holds exactly the model's weights and buffers
            assert states_equal(after, model.state_dict())
            snapshot = {k: v.clone() for k, v in after.items()}
        elif snapshot is not None:
            assert states_equal(after, snapshot)
            assert not states_equal(after, model.state_dict())  # fixed, not following the model
    assert refreshed == [2, 4]
    assert method.refreshes == 2
    # a copy, not an alias of the model's tensors
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ptrs for p in method.labeller.parameters())


def test_pseudo_labels_used_only_after_first_refresh() -> None:
    method = build(refresh_epochs=1, rounds=3, samples_per_class=16)
    method.model.train()
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 1, 16, 16, generator=g)
    labeled = Batch(img, img, torch.randint(0, 3, (2, 16, 16), generator=g), torch.arange(2))
    u = torch.randn(2, 1, 16, 16, generator=g)
    unlabeled = Batch(u, u + 1.0, None, torch.arange(2, 4))
    method.on_epoch_start(0)
    out = method.training_step(labeled, unlabeled, 0)
    assert out.pseudo_label is None and out.logs["rounds_done"] == 0.0
    method.on_epoch_start(1)
    out = method.training_step(labeled, unlabeled, 1)
    assert out.logs["rounds_done"] == 1.0
    with torch.no_grad():
        method.labeller.eval()
        expected = method.labeller(unlabeled.image).argmax(1)  # the weak view, labeller in eval
    assert torch.equal(out.pseudo_label, expected)
