"""UniMatch: CutMixed strong views whose pseudo-labels follow the box pixel for pixel, confident-
pixel masks that count what they claim, a feature-perturbed branch that trains the model, two
different strong views, and a checkpointed generator."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from semiseg.data.transforms import strong_photometric
from semiseg.errors import ConfigError
from semiseg.methods import Batch, method_config
from semiseg.methods.cutmix import cutmix_box
from semiseg.methods.unimatch import UniMatch, UniMatchConfig, masked_dice_loss
from semiseg.models import create_model

K = 3
N, SIZE = 3, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(**params) -> UniMatch:
    torch.manual_seed(0)
    model = create_model("unet", 1, K, base_channels=4, depth=2)
    model.train()
    return UniMatch(model, UniMatchConfig(**params), K)


def unlabeled(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(N, 1, SIZE, SIZE, generator=g)
    strong = strong_photometric(image, g)
    return Batch(image, strong, None, torch.arange(N))


def labeled(seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(N, 1, SIZE, SIZE, generator=g)
    return Batch(image, image, torch.randint(0, K, (N, SIZE, SIZE), generator=g), torch.arange(N))


def test_mixed_views_and_pseudo_labels_follow_the_box_pixel_for_pixel() -> None:
    method = build(threshold=0.4, cutmix_p=1.0)
    batch = unlabeled()
    replay = torch.Generator()
    replay.set_state(method.generator.get_state())
    terms = method.unlabeled_terms(batch)

    # The method's draws, in its order: the second strong view, then one box per view.
    second = strong_photometric(batch.image, replay)
    boxes = [cutmix_box(N, SIZE, SIZE, replay, p=1.0) for _ in range(2)]
    for k, view in enumerate((batch.strong, second)):
        box = terms.boxes[k]
        assert torch.equal(box, boxes[k])
        assert box.any() and (~box).any()
        inside, outside = box[:, None].expand_as(view), ~box[:, None].expand_as(view)
        assert torch.equal(terms.strong_images[k][inside], view.roll(1, 0)[inside])
        assert torch.equal(terms.strong_images[k][outside], view[outside])
        partner_label, partner_used = terms.label.roll(1, 0), terms.used.roll(1, 0)
        assert torch.equal(terms.strong_labels[k][box], partner_label[box])
        assert torch.equal(terms.strong_labels[k][~box], terms.label[~box])
        assert torch.equal(terms.strong_used[k][box], partner_used[box])
        assert torch.equal(terms.strong_used[k][~box], terms.used[~box])
    assert not torch.equal(terms.boxes[0], terms.boxes[1])  # a box of its own per view


def test_confident_pixel_masks_count_what_they_claim() -> None:
    method = build()
    method.model.eval()  # per-sample BatchNorm: the clean branch is exactly model(image)
    batch = unlabeled()
    with torch.no_grad():
        conf, label = method.model(batch.image).softmax(1).max(1)
    method.cfg.threshold = float(conf.median())
    out = method.training_step(labeled(), batch, step=0)
    expected = conf >= method.cfg.threshold
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(out.pseudo_used, expected)
    assert torch.equal(out.pseudo_label, label)
    assert out.logs["mask_ratio"] == pytest.approx(expected.float().mean().item())
    assert set(out.logs) >= {"loss_sup", "loss_unsup", "loss_strong", "loss_fp", "mask_ratio"}


def test_masked_dice_counts_only_kept_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, K, (2, 8, 8), generator=g)
    keep = torch.rand(2, 8, 8, generator=g) > 0.5
    loss = masked_dice_loss(logits, target, keep)
    loss.backward()
    assert (logits.grad.permute(0, 2, 3, 1)[~keep] == 0).all()  # ignored pixels: no gradient
    assert (logits.grad.permute(0, 2, 3, 1)[keep] != 0).any()
    # By hand on the kept pixels alone.
    probs = logits.detach().softmax(1).permute(0, 2, 3, 1)[keep]          # (kept, K)
    onehot = torch.nn.functional.one_hot(target[keep], K).float()
    dice = (2 * (probs * onehot).sum(0) + 1e-5) / ((probs**2).sum(0) + onehot.sum(0) + 1e-5)
    assert loss.item() == pytest.approx((1 - dice).mean().item(), rel=1e-5)
    nothing = torch.zeros_like(keep)
    assert masked_dice_loss(logits, target, nothing).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_perturbed_branch_contributes_gradient() -> None:
    method = build(threshold=0.0, strong_weight=0.0)  # the fp branch alone
    loss = method.unlabeled_loss(unlabeled(), step=0)
    assert loss > 0
    loss.backward()
    grads = {n: p.grad for n, p in method.model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoders")), (
        "the perturbed branch should train the encoder through the kept feature channels")
    strong_only = build(threshold=0.0, fp_weight=0.0)
    strong_only.unlabeled_loss(unlabeled(), step=0).backward()
    assert any(p.grad.abs().sum() > 0 for p in strong_only.model.parameters())
    silent = build(threshold=0.0, strong_weight=0.0, fp_weight=0.0)
    assert silent.unlabeled_loss(unlabeled(), step=0).item() == 0.0


def test_the_two_strong_views_differ() -> None:
    method = build(cutmix_p=0.0)
    batch = unlabeled()
    terms = method.unlabeled_terms(batch)
    assert not terms.boxes[0].any() and not terms.boxes[1].any()
    first, second = terms.strong_images
    assert torch.equal(first, batch.strong)  # the engine's strong view, unmixed
    assert not torch.allclose(first, second)
    assert not torch.allclose(second, batch.image)


def test_state_dict_round_trips_the_generator() -> None:
    method = build(cutmix_p=1.0)
    method.unlabeled_terms(unlabeled())  # advance the generator past its seed
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what the engine's checkpoint reader does

    restored = build(cutmix_p=1.0)
    assert not torch.equal(restored.generator.get_state(), method.generator.get_state())
    restored.load_state_dict(copy.deepcopy(state))
    assert torch.equal(restored.generator.get_state(), method.generator.get_state())
    a, b = method.unlabeled_terms(unlabeled(1)), restored.unlabeled_terms(unlabeled(1))
    for k in range(2):
        assert torch.equal(a.boxes[k], b.boxes[k])
        assert torch.equal(a.strong_images[k], b.strong_images[k])


def test_generator_follows_the_run_seed() -> None:
    same = build().generator.get_state(), build().generator.get_state()
    assert torch.equal(*same)
    torch.manual_seed(1)
    other = UniMatch(create_model("unet", 1, K, base_channels=4, depth=2), UniMatchConfig(), K)
    assert not torch.equal(other.generator.get_state(), same[0])


def test_ce_dice_option_adds_cross_entropy() -> None:
    dice, ce_dice = build(threshold=0.0), build(threshold=0.0, pseudo_loss="ce_dice")
    torch.manual_seed(5)
    a = dice.unlabeled_loss(unlabeled(), step=0)
    torch.manual_seed(5)  # same dropout masks
    b = ce_dice.unlabeled_loss(unlabeled(), step=0)
    assert torch.isfinite(b) and not torch.isclose(a, b)


@pytest.mark.parametrize("key, value, expected", [
    ("threshold", 1.5, r"method.params.threshold=1.5: expected a value in \[0, 1\]"),
    ("cutmix_p", -0.1, r"method.params.cutmix_p=-0.1: expected a value in \[0, 1\]"),
    ("fp_dropout", 1.0, r"method.params.fp_dropout=1.0: expected a value in \[0, 1\)"),
    ("strong_weight", -1.0, r"method.params.strong_weight=-1.0: expected a value >= 0"),
    ("unlabeled_weight", -2.0, r"method.params.unlabeled_weight=-2.0: expected a value >= 0"),
    ("pseudo_loss", "ce", r"pseudo_loss='?ce'?.*dice"),
])
def test_bad_params_name_the_key(key: str, value, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        method_config("unimatch", {key: value})
