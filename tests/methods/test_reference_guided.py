"""Reference-guided pseudo-labels: nearest-reference matching and its vote margin, chunking, the
matched layer, and the persistent class-balanced bank over every labeled image (it holds each
image's classes, refreshes at epoch starts and as a queue), on hand-built features and tiny
U-Nets whose answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from semiseg.methods import Batch
from semiseg.data.sampling import RandomBatches, SplitTensors, Subset
from semiseg.engine import LoopSettings, RandomStreams, Trainer
from semiseg.errors import ConfigError
from semiseg.methods.reference_guided import (
    ReferenceBank, ReferenceGuided, ReferenceGuidedConfig, layer_features, match_labels,
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
    ranked = votes.sort(dim=1, descending=True).values
    return votes.argmax(1), sims.max(1).values, (ranked[:, 0] - ranked[:, 1]) / votes.sum(1)


def test_k1_query_takes_label_of_nearest_bank_vector() -> None:
    # Each query is a slightly perturbed copy of one bank vector.
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 5, 2, 0])
    query = F.normalize(BANK[targets] + 0.05 * torch.randn(len(targets), 3, generator=g), dim=1)
    labels, best, margin = match_labels(query, BANK, BANK_LABELS, k=1, num_classes=3, chunk_size=4)
    assert labels.tolist() == BANK_LABELS[targets].tolist()
    assert labels.dtype == torch.long
    torch.testing.assert_close(best, (query * BANK[targets]).sum(1))
    torch.testing.assert_close(margin, torch.ones(len(targets)))  # one vote: no runner-up


def test_k1_and_k3_disagree_as_documented() -> None:
    """q is closest to the class-0 vector e_x (cos 0.999) but its 2nd and 3rd neighbours are the
    two class-1 vectors (cos 0.857 each): k=1 says 0, the similarity-weighted vote of k=3 says
    1 (0.857 + 0.857 > 0.999)."""
    q = unit(1, 0, 0.05)[None]
    l1, b1, _ = match_labels(q, BANK, BANK_LABELS, k=1, num_classes=3, chunk_size=16)
    l3, b3, m3 = match_labels(q, BANK, BANK_LABELS, k=3, num_classes=3, chunk_size=16)
    assert l1.tolist() == [0]
    assert l3.tolist() == [1]
    # The best similarity is that of the single nearest vector whatever k is.
    assert b1.item() == pytest.approx(float(q[0] @ BANK[0]), abs=1e-6)
    assert b3.item() == pytest.approx(b1.item(), abs=1e-6)
    # margin = (class-1 weight - class-0 weight) / total of the three votes
    s0, s1 = float(q[0] @ BANK[0]), float(q[0] @ BANK[2])
    expected = (2 * s1 - s0) / (2 * s1 + s0)
    assert 0.2 < expected < 0.3
    assert m3.item() == pytest.approx(expected, abs=1e-5)


def test_k3_vote_is_weighted_by_similarity_not_counted() -> None:
    """Top 3 of q = e_x: class 1 (cos 0.995), class 2 (cos 0.3), class 2 (cos 0.3). A plain
    majority vote would say 2; the similarity-weighted vote says 1 (0.995 > 0.3 + 0.3)."""
    bank = torch.stack([unit(1, 0.1, 0), unit(0.3, 0.9539, 0), unit(0.3, 0, 0.9539),
                        unit(-1, 0, 0)])
    bank_labels = torch.tensor([1, 2, 2, 0])
    q = unit(1, 0, 0)[None]
    sims = (q @ bank.T)[0]
    assert sims[0] > sims[1] + sims[2] + 0.3  # the weighted vote is clear-cut
    labels, _, _ = match_labels(q, bank, bank_labels, k=3, num_classes=3, chunk_size=8)
    assert labels.tolist() == [1]
    labels, _, _ = match_labels(q, bank, bank_labels, k=1, num_classes=3, chunk_size=8)
    assert labels.tolist() == [1]


def test_negative_similarities_carry_no_weight() -> None:
    """q = -e_x has cos 0 with bank vectors 1, 4 and 5 and negative cos with the rest. The
    top 3 are those at cos 0 (class 0, 2, 2); clamped at 0 they vote by count alone -> 2."""
    q = unit(-1, 0, 0)[None]
    labels, best, _ = match_labels(q, BANK, BANK_LABELS, k=3, num_classes=3, chunk_size=8)
    assert labels.tolist() == [2]
    assert best.item() == pytest.approx(0.0, abs=1e-6)


def test_k_larger_than_bank_uses_whole_bank() -> None:
    q = unit(1, 0, 0.05)[None]
    labels, _, _ = match_labels(q, BANK, BANK_LABELS, k=100, num_classes=3, chunk_size=8)
    expected, _, _ = reference_match(q, BANK, BANK_LABELS, k=6, num_classes=3)
    assert labels.tolist() == expected.tolist()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_plain_reference_on_random_features(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    query = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    bank_labels = torch.randint(0, 4, (40,), generator=g)
    labels, best, margin = match_labels(query, bank, bank_labels, k, num_classes=4, chunk_size=64)
    ref_labels, ref_best, ref_margin = reference_match(query, bank, bank_labels, k, num_classes=4)
    assert torch.equal(labels, ref_labels)
    # the best-similarity output is the true max cosine over the whole bank
    torch.testing.assert_close(best, ref_best, rtol=0, atol=1e-6)
    torch.testing.assert_close(margin, ref_margin, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_chunk_size_does_not_change_the_result(k: int) -> None:
    g = torch.Generator().manual_seed(10 + k)
    query = F.normalize(torch.randn(257, 6, generator=g), dim=1)
    bank = F.normalize(torch.randn(33, 6, generator=g), dim=1)
    bank_labels = torch.randint(0, 3, (33,), generator=g)
    results = [match_labels(query, bank, bank_labels, k, 3, chunk)
               for chunk in (1, 7, 256, 257, 1000)]
    for labels, best, _ in results[1:]:
        assert torch.equal(labels, results[0][0])
        # matmul blocking may differ in the last bit between chunk shapes
        torch.testing.assert_close(best, results[0][1], rtol=0, atol=1e-6)
    assert all(len(r.labels) == 257 and len(r.best) == 257 for r in results)


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
        labels, best, _ = match_labels(query, bank, bank_labels, k, 3, chunk)
    assert seen.largest <= chunk * m, f"largest intermediate {seen.largest} > {chunk} x {m}"
    assert (chunk, m) in seen.shapes  # the similarities really are chunk x M blocks
    assert labels.shape == (n,) and best.shape == (n,)


def test_vote_margin_falls_to_zero_between_two_classes() -> None:
    """Queries moving from one class cluster to a mirror-image other: with k = 4 the margin is 1
    while all four neighbours are one class, then falls, and is 0 at the midpoint, where the
    two classes' neighbours tie."""
    bank = torch.stack([unit(1, 0, 0.1 * i) for i in range(4)] + [unit(0, 1, 0.1 * i) for i in range(4)])
    bank_labels = torch.tensor([0] * 4 + [1] * 4)
    query = torch.stack([unit(1 - t, t, 0) for t in torch.linspace(0, 0.5, 6).tolist()])
    labels, _, margin = match_labels(query, bank, bank_labels, 4, 2, 16)
    assert labels[0] == 0
    assert margin[0] == pytest.approx(1.0, abs=1e-5)
    assert margin[-1] == pytest.approx(0.0, abs=1e-5)
    assert (margin[1:] <= margin[:-1] + 1e-6).all()  # never rises toward the boundary
    assert ((margin >= 0.0) & (margin <= 1.0 + 1e-6)).all()


# ---- helpers --------------------------------------------------------------------------------

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



# ---- the matched layer (UNet's return_decoder_maps) -------------------------------------------

def tiny_unet(depth: int = 2):
    torch.manual_seed(0)
    return create_model("unet", 1, NUM_CLASSES, base_channels=4, depth=depth).eval()


def test_unet_decoder_maps_end_with_the_returned_features() -> None:
    model = tiny_unet(depth=3)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        logits2, maps = model(x, return_decoder_maps=True)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 4), (2, 8, 8, 8), (2, 4, 16, 16)]
    assert torch.equal(maps[-1], feats) and torch.equal(logits2, logits)
    with pytest.raises(ValueError, match="return_decoder_maps cannot be combined"):
        model(x, return_decoder_maps=True, return_features=True)


def test_layer_features_are_unit_and_concat_averages_the_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 8, 4, 4, generator=g), torch.rand(2, 4, 8, 8, generator=g)]
    last, previous, both = (layer_features(maps, name) for name in ("last", "previous", "concat"))
    assert last.shape == (2, 4, 8, 8) and previous.shape == (2, 8, 8, 8) and both.shape == (2, 12, 8, 8)
    for f in (last, previous, both):
        torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 8, 8))
    up = F.interpolate(maps[0], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(previous, F.normalize(up, dim=1))
    a, b = (0, slice(None), 1, 2), (1, slice(None), 5, 7)  # two pixels
    cos = lambda f: float(f[a] @ f[b])  # noqa: E731
    assert cos(both) == pytest.approx((cos(last) + cos(previous)) / 2, abs=1e-6)


def test_config_refuses_unknown_layer_and_refresh() -> None:
    with pytest.raises(ConfigError, match="method.params.feature_layer='first': expected one of"):
        ReferenceGuidedConfig(feature_layer="first")
    with pytest.raises(ConfigError, match="method.params.bank_refresh='never'"):
        ReferenceGuidedConfig(bank_refresh="never")
    with pytest.raises(ConfigError, match="at least 2 decoder stages"):
        ReferenceGuided(tiny_unet(depth=1), ReferenceGuidedConfig(), NUM_CLASSES)
    ReferenceGuided(tiny_unet(depth=1), ReferenceGuidedConfig(feature_layer="last"), NUM_CLASSES)


# ---- the persistent bank ----------------------------------------------------------------------

def labeled_set() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five 16x16 labeled images (dataset indices 10..14) with different classes: class 2 is in
    image 12 only, and there as 3 pixels; image 14 is all background."""
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(5, 16, 16, dtype=torch.long)
    masks[0, :8] = 1
    masks[1, 4:12, 4:12] = 1
    masks[2, 0, :3] = 2
    masks[2, 8:, 8:] = 1
    masks[3, :, :2] = 1
    images = masks[:, None].float() + 0.3 * torch.randn(5, 1, 16, 16, generator=g)
    return images, masks, torch.arange(10, 15)


def build_with_set(**params):
    method = build(**params)
    images, masks, index = labeled_set()
    method.set_labeled_set(images, masks, index)
    return method, (images, masks, index)


def owned_rows_trace_back(method, images, masks, index) -> None:
    """Every bank row is the current matcher's feature of a pixel of its owner with its label."""
    feats, labels, owners = method.bank.tensors()
    with torch.no_grad():
        current = method._features(images)
    for j, i in enumerate(index.tolist()):
        rows = owners == i
        flat = current[j].reshape(current.shape[1], -1).T
        dist = (feats[rows][:, None] - flat[None]).abs().amax(-1)
        src = dist.argmin(1)
        assert dist.min(1).values.max() < 1e-5, f"image {i}: a row is no pixel of its features"
        assert torch.equal(masks[j].reshape(-1)[src], labels[rows])
        assert len(src.unique()) == len(src)  # drawn without replacement


def test_bank_holds_every_labeled_images_classes_class_balanced() -> None:
    method, (images, masks, index) = build_with_set(bank_size=90)
    method.on_epoch_start(0)
    feats, labels, owners = method.bank.tensors()
    assert set(owners.tolist()) == set(index.tolist())
    for j, i in enumerate(index.tolist()):
        assert set(labels[owners == i].tolist()) == set(masks[j].unique().tolist()), f"image {i}"
    # class-balanced: 30 per class, split over the images that have the class
    count = lambda c: int((labels == c).sum())  # noqa: E731
    assert count(0) == 5 * 6                      # 5 images with background: 6 each
    assert count(1) == 4 * 8                      # 4 images with class 1: ceil(30 / 4) = 8 each
    assert count(2) == 3                          # its only 3 pixels
    owned_rows_trace_back(method, images, masks, index)


def test_bank_refreshes_from_the_matcher_at_each_epoch_start() -> None:
    method, (images, masks, index) = build_with_set(bank_size=60)
    method.on_epoch_start(0)
    with torch.no_grad():
        first = method._features(images)
    labeled, unlabeled = batches()
    for step in range(2):  # plain SGD steps by hand (torch.optim's first use imports dynamo)
        method.training_step(labeled, unlabeled, step).loss.backward()
        with torch.no_grad():
            for p in method.model.parameters():
                p -= 0.5 * p.grad
                p.grad = None
        method.after_optimizer_step(step)
    method.on_epoch_start(1)
    with torch.no_grad():
        moved = method._features(images)
    assert (moved - first).abs().max() > 1e-3  # the matcher moved, so the check below means it
    assert set(method.bank.tensors()[2].tolist()) == set(index.tolist())
    owned_rows_trace_back(method, images, masks, index)  # rows are the moved matcher's features


def test_queue_replaces_only_the_batch_images_entries() -> None:
    method, (images, masks, index) = build_with_set(bank_size=60)
    method.on_epoch_start(0)
    old = {i: tuple(t.clone() for t in e) for i, e in method.bank.entries.items()}
    # a labeled batch of images 11 and 13 (image 11 drawn twice), flipped as an augmentation
    pick = torch.tensor([1, 3, 1])
    labeled = Batch(images[pick].flip(-1), images[pick].flip(-1), masks[pick].flip(-1), index[pick])
    _, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)
    for i in (10, 12, 14):
        assert all(torch.equal(a, b) for a, b in zip(method.bank.entries[i], old[i])), i
    for i in (11, 13):
        assert not torch.equal(method.bank.entries[i][0], old[i][0]), i
        assert set(method.bank.entries[i][1].tolist()) == set(masks[i - 10].unique().tolist())

    epoch_only, _ = build_with_set(bank_size=60, bank_refresh="epoch")
    epoch_only.on_epoch_start(0)
    kept = epoch_only.bank.tensors()[0].clone()
    epoch_only.training_step(labeled, unlabeled, step=0)
    assert torch.equal(epoch_only.bank.tensors()[0], kept)


def test_bank_quota_is_at_least_one_and_counts_images_per_class() -> None:
    bank = ReferenceBank(num_classes=3, size=6)          # 2 per class
    masks = torch.zeros(4, 2, 2, dtype=torch.long)
    masks[:3, 0, 0] = 1
    bank.know(masks, torch.arange(4))
    assert bank.quota().tolist() == [1, 1, 2]            # ceil(2/4), ceil(2/3), nobody has class 2


def test_student_refresh_leaves_its_mode_and_statistics() -> None:
    method, _ = build_with_set(feature_ema=0.0)
    model = method.model
    model.eval()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    method.on_epoch_start(0)
    assert not model.training
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    assert len(method.bank) > 0


def test_trainer_hands_the_labeled_set_and_the_bank_covers_it() -> None:
    images, masks, index = labeled_set()
    method = build(bank_size=60)
    unl = Subset(torch.randn(4, 1, 16, 16), None, torch.arange(20, 24))
    tensors = SplitTensors(Subset(images, masks, index), unl, Subset(images, masks, index),
                           Subset(images, masks, index), hidden_unlabeled_masks=None)
    opt = torch.optim.SGD(method.model.parameters(), lr=0.1)
    streams = RandomStreams(RandomBatches(5, 2, 0), RandomBatches(4, 2, 1),
                            torch.Generator().manual_seed(2))
    trainer = Trainer(method.model, method, tensors, opt,
                      torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), streams,
                      ["bg", "a", "b"], [f"i{i}" for i in range(24)],
                      LoopSettings(epochs=1, steps_per_epoch=1))
    assert torch.equal(method.labeled_set[2], index)
    trainer.run_epoch(0)
    assert set(method.bank.tensors()[2].tolist()) == set(index.tolist())


# ---- the method -------------------------------------------------------------------------------

def test_pseudo_labels_come_from_matching_the_weak_view() -> None:
    method = build(k=3, min_margin=0.4, bank_size=64)
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)
    bank, bank_labels, _ = method.bank.tensors()
    assert len(bank) <= 64 + NUM_CLASSES * 2 and set(bank_labels.tolist()) <= set(range(NUM_CLASSES))
    label, used = method.pseudo_labels(unlabeled)
    with torch.no_grad():
        _, maps = method.matcher(unlabeled.image, return_decoder_maps=True)
    query = layer_features(maps, "concat").permute(0, 2, 3, 1).reshape(-1, 12)
    expected = match_labels(query, bank, bank_labels, 3, NUM_CLASSES, 10_000)
    assert torch.equal(label, expected.labels.view(2, 16, 16))
    assert torch.equal(used, (expected.margin >= 0.4).view(2, 16, 16))
    assert 0 < used.float().mean() < 1  # the filter leaves some pixels out and keeps others


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
    # no cosine similarity is below -1, and no margin below 0
    method = build(similarity_threshold=-1.0, min_margin=0.0)
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
    expected, _, _ = match_labels(query, bank, bank_labels, k, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels, best, margin = match_labels(query, bank, bank_labels, k, 3, 16)
    assert labels.shape == (64,) and torch.isfinite(best.float()).all()
    assert torch.isfinite(margin).all()
    assert (labels == expected).float().mean() > 0.9  # bf16 may flip near-ties only


def test_training_step_under_bf16_autocast() -> None:
    method = build()
    labeled, unlabeled = batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(labeled, unlabeled, step=1000)
    assert torch.isfinite(out.loss)
