"""Reference-guided pseudo-labels: nearest-reference matching, the class-balanced bank, chunking
and the similarity threshold, on hand-built features whose answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from semiseg.methods import Batch
from semiseg.methods.reference_guided import (
    ReferenceGuided, ReferenceGuidedConfig, match_labels, sample_bank,
)
from semiseg.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unit(*v: float) -> torch.Tensor:
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


# Six unit vectors in 3D, two per class. The two class-1 vectors flank the x axis, so a query
# on the x axis is nearest to the class-0 vector e_x but has two class-1 vectors close behind.
BANK = torch.stack([
    unit(1, 0, 0),       # 0: class 0
    unit(0, 0, 1),       # 1: class 0
    unit(1, 0.6, 0),     # 2: class 1  (cos to e_x = 0.857)
    unit(1, -0.6, 0),    # 3: class 1  (cos to e_x = 0.857)
    unit(0, 1, 0),       # 4: class 2
    unit(0, -1, 0),      # 5: class 2
])
BANK_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def reference_match(query, bank, bank_labels, k, num_classes):
    """The documented behaviour, written out plainly on the full N x M matrix."""
    sims = query @ bank.T
    top_sim, top_idx = sims.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(query), num_classes)
    for i in range(len(query)):
        for s, j in zip(top_sim[i], top_idx[i]):
            votes[i, bank_labels[j]] += max(float(s), 0.0) + 1e-6
    return votes.argmax(1), sims.max(1).values


def test_k1_query_takes_label_of_nearest_bank_vector() -> None:
    # Each query is a slightly perturbed copy of one bank vector.
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 5, 2, 0])
    query = F.normalize(BANK[targets] + 0.05 * torch.randn(len(targets), 3, generator=g), dim=1)
    labels, best = match_labels(query, BANK, BANK_LABELS, k=1, num_classes=3, chunk_size=4)
    assert labels.tolist() == BANK_LABELS[targets].tolist()
    assert labels.dtype == torch.long
    torch.testing.assert_close(best, (query * BANK[targets]).sum(1))


def test_k1_and_k3_disagree_as_documented() -> None:
    """q is closest to the class-0 vector e_x (cos 0.999) but its 2nd and 3rd neighbours are the
    two class-1 vectors (cos 0.857 each): k=1 says 0, the similarity-weighted vote of k=3 says
    1 (0.857 + 0.857 > 0.999)."""
    q = unit(1, 0, 0.05)[None]
    l1, b1 = match_labels(q, BANK, BANK_LABELS, k=1, num_classes=3, chunk_size=16)
    l3, b3 = match_labels(q, BANK, BANK_LABELS, k=3, num_classes=3, chunk_size=16)
    assert l1.tolist() == [0]
    assert l3.tolist() == [1]
    # The best similarity is that of the single nearest vector whatever k is.
    assert b1.item() == pytest.approx(float(q[0] @ BANK[0]), abs=1e-6)
    assert b3.item() == pytest.approx(b1.item(), abs=1e-6)


def test_k3_vote_is_weighted_by_similarity_not_counted() -> None:
    """Top 3 of q = e_x: class 1 (cos 0.995), class 2 (cos 0.3), class 2 (cos 0.3). A plain
    majority vote would say 2; the similarity-weighted vote says 1 (0.995 > 0.3 + 0.3)."""
    bank = torch.stack([unit(1, 0.1, 0), unit(0.3, 0.9539, 0), unit(0.3, 0, 0.9539),
                        unit(-1, 0, 0)])
    bank_labels = torch.tensor([1, 2, 2, 0])
    q = unit(1, 0, 0)[None]
    sims = (q @ bank.T)[0]
    assert sims[0] > sims[1] + sims[2] + 0.3  # the weighted vote is clear-cut
    labels, _ = match_labels(q, bank, bank_labels, k=3, num_classes=3, chunk_size=8)
    assert labels.tolist() == [1]
    labels, _ = match_labels(q, bank, bank_labels, k=1, num_classes=3, chunk_size=8)
    assert labels.tolist() == [1]


def test_negative_similarities_carry_no_weight() -> None:
    """q = -e_x has cos 0 with bank vectors 1, 4 and 5 and negative cos with the rest. The
    top 3 are those at cos 0 (class 0, 2, 2); clamped at 0 they vote by count alone -> 2."""
    q = unit(-1, 0, 0)[None]
    labels, best = match_labels(q, BANK, BANK_LABELS, k=3, num_classes=3, chunk_size=8)
    assert labels.tolist() == [2]
    assert best.item() == pytest.approx(0.0, abs=1e-6)


def test_k_larger_than_bank_uses_whole_bank() -> None:
    q = unit(1, 0, 0.05)[None]
    labels, _ = match_labels(q, BANK, BANK_LABELS, k=100, num_classes=3, chunk_size=8)
    expected, _ = reference_match(q, BANK, BANK_LABELS, k=6, num_classes=3)
    assert labels.tolist() == expected.tolist()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_plain_reference_on_random_features(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    query = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    bank_labels = torch.randint(0, 4, (40,), generator=g)
    labels, best = match_labels(query, bank, bank_labels, k, num_classes=4, chunk_size=64)
    ref_labels, ref_best = reference_match(query, bank, bank_labels, k, num_classes=4)
    assert torch.equal(labels, ref_labels)
    # the best-similarity output is the true max cosine over the whole bank
    torch.testing.assert_close(best, ref_best, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_chunk_size_does_not_change_the_result(k: int) -> None:
    g = torch.Generator().manual_seed(10 + k)
    query = F.normalize(torch.randn(257, 6, generator=g), dim=1)
    bank = F.normalize(torch.randn(33, 6, generator=g), dim=1)
    bank_labels = torch.randint(0, 3, (33,), generator=g)
    results = [match_labels(query, bank, bank_labels, k, 3, chunk)
               for chunk in (1, 7, 256, 257, 1000)]
    for labels, best in results[1:]:
        assert torch.equal(labels, results[0][0])
        # matmul blocking may differ in the last bit between chunk shapes
        torch.testing.assert_close(best, results[0][1], rtol=0, atol=1e-6)
    assert all(len(labels) == 257 and len(best) == 257 for labels, best in results)


class LargestOutput(TorchFunctionMode):
    """Records the largest tensor any torch function returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("k", [1, 4])
def test_never_builds_more_than_chunk_by_bank(k: int) -> None:
    """Structural memory bound: no intermediate is larger than chunk_size x M (the full N x M
    similarity matrix here would be 20x that)."""
    n, m, chunk = 20_000, 256, 1000
    g = torch.Generator().manual_seed(3)
    query = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(m, 8, generator=g), dim=1)
    bank_labels = torch.randint(0, 3, (m,), generator=g)
    with LargestOutput() as seen:
        labels, best = match_labels(query, bank, bank_labels, k, 3, chunk)
    assert seen.largest <= chunk * m, f"largest intermediate {seen.largest} > {chunk} x {m}"
    assert (chunk, m) in seen.shapes  # the similarities really are chunk x M blocks
    assert labels.shape == (n,) and best.shape == (n,)


def test_sample_bank_is_class_balanced_and_normalised() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 10, 20, dtype=torch.long)  # 400 pixels
    masks[0, :2, :5] = 1                               # 10 pixels of class 1
    masks[1, 5:7, 10:15] = 1                           # another 10: 5% class 1 in all
    assert (masks == 1).float().mean().item() == pytest.approx(0.05)
    # channel 0 carries the label, so each bank row can be traced back to its class
    features = torch.randn(2, 5, 10, 20, generator=g) * 3
    features[:, 0] = masks.float() * 10 + 5

    for bank_size, num_classes in [(64, 2), (16, 2), (90, 3), (10_000, 2)]:
        bank, labels = sample_bank(features, masks, bank_size, num_classes)
        per_class = bank_size // num_classes
        assert (labels == 0).sum().item() == min(380, per_class)
        assert (labels == 1).sum().item() == min(20, per_class)
        assert bank.shape == (len(labels), 5)
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(len(bank)))
        # every bank row is the normalised feature of a pixel of its label, drawn without
        # replacement
        flat = F.normalize(features, dim=1).permute(0, 2, 3, 1).reshape(-1, 5)
        flat_labels = masks.reshape(-1)
        dist = (bank[:, None] - flat[None]).abs().amax(-1)
        src = dist.argmin(1)
        assert dist.min(1).values.max() < 1e-6
        assert torch.equal(flat_labels[src], labels)
        assert len(src.unique()) == len(src)


def test_sample_bank_does_not_track_gradients() -> None:
    features = torch.randn(1, 4, 8, 8, requires_grad=True)
    masks = torch.randint(0, 3, (1, 8, 8))
    bank, _ = sample_bank(features, masks, 30, 3)
    assert not bank.requires_grad


# ---- the method -------------------------------------------------------------------------------

NUM_CLASSES = 3


def batches(seed: int = 0) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, 1, 16, 16, generator=g)
    labeled = Batch(img, img + 0.1, torch.randint(0, NUM_CLASSES, (2, 16, 16), generator=g),
                    torch.arange(2))
    u = torch.randn(2, 1, 16, 16, generator=g)
    unlabeled = Batch(u, u * 0.5 + 0.2 * torch.randn(2, 1, 16, 16, generator=g), None,
                      torch.arange(2, 4))
    return labeled, unlabeled


def build(**params) -> ReferenceGuided:
    torch.manual_seed(0)
    model = create_model("unet", 1, NUM_CLASSES, base_channels=4, depth=2)
    model.train()
    return ReferenceGuided(model, ReferenceGuidedConfig(**params), NUM_CLASSES)


def test_pseudo_labels_come_from_matching_the_weak_view() -> None:
    method = build(k=1, bank_size=64)
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)
    bank, bank_labels = method.bank
    assert len(bank) <= 64 and set(bank_labels.tolist()) <= set(range(NUM_CLASSES))
    label, used = method.pseudo_labels(unlabeled)
    with torch.no_grad():
        _, feats = method.model(unlabeled.image, return_features=True)
    query = F.normalize(feats, dim=1).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    expected, _ = match_labels(query, bank, bank_labels, 1, NUM_CLASSES, 10_000)
    assert torch.equal(label, expected.view(2, 16, 16))
    # threshold 0 keeps every pixel: the decoder features follow a ReLU, so cosines are >= 0
    assert used.all()


def test_threshold_above_every_similarity_uses_no_pixel() -> None:
    method = build()
    # Above any cosine similarity; the config refuses it (its range is [-1, 1]), so set it after.
    method.cfg.similarity_threshold = 1.5
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=1000)
    assert out.pseudo_used is not None and not out.pseudo_used.any()
    assert out.logs["loss_unsup"] == 0.0
    assert out.logs["mask_ratio"] == 0.0
    loss = method.unlabeled_loss(unlabeled, step=1000)
    assert loss.item() == 0.0
    # and then the total is exactly the supervised loss
    assert out.loss.item() == pytest.approx(out.logs["loss_sup"], abs=0)


def test_threshold_below_every_similarity_uses_every_pixel() -> None:
    method = build(similarity_threshold=-1.0)  # no cosine similarity is below -1
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=1000)
    assert out.pseudo_used.all()
    assert out.logs["mask_ratio"] == 1.0
    assert method.unlabeled_loss(unlabeled, step=1000).item() > 0



# bf16 autocast is the engine's default on CUDA (train.amp=True); CPU autocast reproduces it.

@pytest.mark.parametrize("k", [1, 3])
def test_match_labels_under_bf16_autocast(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    bank_labels = torch.arange(12) % 3
    expected, _ = match_labels(query, bank, bank_labels, k, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels, best = match_labels(query, bank, bank_labels, k, 3, 16)
    assert labels.shape == (64,) and torch.isfinite(best.float()).all()
    assert (labels == expected).float().mean() > 0.9  # bf16 may flip near-ties only


def test_training_step_under_bf16_autocast() -> None:
    method = build()
    labeled, unlabeled = batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(labeled, unlabeled, step=1000)
    assert torch.isfinite(out.loss)
