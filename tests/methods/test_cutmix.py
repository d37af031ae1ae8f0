"""CutMix: UniMatch's box sampling, `mix` on images, labels, confidences and soft targets, and
the methods that offer it training on images and targets mixed with the same box."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.methods import Batch
from semiseg.methods.common import masked_cross_entropy
from semiseg.methods.cutmix import cutmix_box, mix, partner, step_generator
from semiseg.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from semiseg.methods.pseudo_label import PseudoLabel, PseudoLabelConfig
from semiseg.methods.reference_guided import ReferenceGuided, ReferenceGuidedConfig
from semiseg.models import create_model

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- boxes -----------------------------------------------------------------------------------


def test_boxes_are_single_rectangles_of_unimatch_size() -> None:
    n, h, w = 400, 64, 48
    box = cutmix_box(n, h, w, gen(0), p=1.0)
    assert box.shape == (n, h, w) and box.dtype == torch.bool
    assert box.flatten(1).any(1).all()  # p = 1: every image gets a box
    for b in box:
        rows, cols = b.any(1).nonzero()[:, 0], b.any(0).nonzero()[:, 0]
        bh, bw = len(rows), len(cols)
        # contiguous, and every pixel of its bounding rectangle inside: a rectangle
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw
        assert b.sum() == bh * bw
        # area 0.02-0.4 of the image (less by the floor to whole pixels and the cap at a side)
        assert 0.02 * h * w - (bh + bw) <= bh * bw <= 0.4 * h * w + 1e-9
    area = box.float().mean((1, 2))
    assert area.min() < 0.06 and area.max() > 0.3  # spans the range, not a fixed size
    # both orientations occur (h / w drawn in [0.3, 1/0.3])
    heights, widths = box.any(2).sum(1), box.any(1).sum(1)
    assert (heights > 1.5 * widths).any() and (widths > 1.5 * heights).any()
    # positions cover the image, not only one corner
    tops = box.any(2).float().argmax(1)
    lefts = box.any(1).float().argmax(1)
    assert tops.min() == 0 or lefts.min() == 0
    assert (tops + heights).max() == h or (lefts + widths).max() == w


def test_box_probability_and_reproducibility() -> None:
    assert not cutmix_box(50, 16, 16, gen(0), p=0.0).any()
    boxes = cutmix_box(2000, 16, 16, gen(1), p=0.5)
    frac = boxes.flatten(1).any(1).float().mean().item()
    assert abs(frac - 0.5) < 0.05
    assert torch.equal(cutmix_box(8, 20, 20, gen(3)), cutmix_box(8, 20, 20, gen(3)))
    assert not torch.equal(cutmix_box(8, 20, 20, gen(3), p=1.0), cutmix_box(8, 20, 20, gen(4), p=1.0))
    assert torch.equal(cutmix_box(4, 9, 9, step_generator(7, 3), p=1.0),
                       cutmix_box(4, 9, 9, step_generator(7, 3), p=1.0))
    with pytest.raises(ValueError, match="p=1.5"):
        cutmix_box(2, 8, 8, gen(0), p=1.5)


# ---- mix -------------------------------------------------------------------------------------


def test_mix_takes_b_inside_the_box_for_every_kind_of_tensor() -> None:
    g = gen(0)
    box = cutmix_box(3, 10, 12, g, p=1.0)
    cases = [torch.randn(3, 2, 10, 12, generator=g),                 # images / soft targets
             torch.randint(0, K, (3, 10, 12), generator=g),          # hard labels
             torch.rand(3, 10, 12, generator=g),                     # confidences
             torch.rand(3, 10, 12, generator=g) < 0.5]               # used-pixel masks
    for a in cases:
        b = partner(a)
        out = mix(a, b, box)
        assert out.shape == a.shape and out.dtype == a.dtype
        inside = box[:, None].expand_as(a) if a.dim() == 4 else box
        assert torch.equal(out[inside], b[inside])
        assert torch.equal(out[~inside], a[~inside])


def test_mix_refuses_misfit_shapes() -> None:
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="differ in shape"):
        mix(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5), box)
    with pytest.raises(ValueError, match="does not fit box"):
        mix(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), box)
    with pytest.raises(ValueError, match="bool"):
        mix(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), box.float())


def test_partner_is_the_batch_rolled_by_one() -> None:
    x = torch.arange(4)[:, None, None].expand(4, 2, 2)
    assert partner(x)[:, 0, 0].tolist() == [3, 0, 1, 2]


def test_mixed_image_and_target_stay_aligned_pixel_for_pixel() -> None:
    """Every pixel carries a unique id (image, row, column) in both the image and its target;
    after mixing the image and the target with the same box, the ids still agree everywhere,
    and inside the boxes they come from the partner image."""
    n, h, w = 6, 12, 10
    ids = torch.arange(n * h * w).view(n, h, w)
    image = ids[:, None].float()                # (N, 1, H, W)
    box = cutmix_box(n, h, w, gen(5), p=1.0)
    mixed_image = mix(image, partner(image), box)
    mixed_target = mix(ids, partner(ids), box)
    assert torch.equal(mixed_image[:, 0].long(), mixed_target)
    source = mixed_target // (h * w)            # which image each pixel came from
    own = torch.arange(n)[:, None, None].expand(n, h, w)
    assert torch.equal(source[~box], own[~box])
    assert torch.equal(source[box], ((own - 1) % n)[box])
    assert torch.equal(mixed_target % (h * w), ids % (h * w))  # same position, never moved


# ---- methods ---------------------------------------------------------------------------------


def unlabeled(seed: int = 0, n: int = 4) -> Batch:
    g = gen(seed)
    u = torch.randn(n, 1, 16, 16, generator=g)
    return Batch(u, 0.7 * u + 0.3 * torch.randn(n, 1, 16, 16, generator=g), None, torch.arange(n))


def labeled(seed: int = 1, n: int = 4) -> Batch:
    g = gen(seed)
    img = torch.randn(n, 1, 16, 16, generator=g)
    return Batch(img, img, torch.randint(0, K, (n, 16, 16), generator=g), torch.arange(n))


def build(cls, config, **params):
    torch.manual_seed(0)
    model = create_model("unet", 1, K, base_channels=4, depth=2)
    model.train()
    return cls(model, config(**params), K)


@pytest.mark.parametrize("cls, config", [(PseudoLabel, PseudoLabelConfig),
                                         (ReferenceGuided, ReferenceGuidedConfig)])
def test_weak_to_strong_trains_on_mixed_image_with_mixed_labels(cls, config) -> None:
    method = build(cls, config, cutmix=True, cutmix_p=1.0, rampup_fraction=0.0,
                   **({"threshold": 0.5} if cls is PseudoLabel else {}))
    batch, step = unlabeled(), 7
    method.training_step(labeled(), batch, step)  # fills the reference bank
    loss = method.unlabeled_loss(batch, step)
    box = method.cutmix.box(batch.strong, step)
    assert box.flatten(1).any(1).all()
    label, used = method.pseudo_labels(batch)
    with torch.no_grad():
        logits = method.model(mix(batch.strong, partner(batch.strong), box))
    expected = masked_cross_entropy(logits, mix(label, partner(label), box),
                                    mix(used, partner(used), box))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the unmixed labels would give another loss: the mix is really applied
    assert not math.isclose(masked_cross_entropy(logits, label, used).item(), expected.item(),
                            rel_tol=1e-4)


def test_weak_to_strong_reports_unmixed_pseudo_labels() -> None:
    method = build(PseudoLabel, PseudoLabelConfig, cutmix=True, cutmix_p=1.0, threshold=0.0)
    batch = unlabeled()
    out = method.training_step(labeled(), batch, 3)
    label, used = method.pseudo_labels(batch)
    assert torch.equal(out.pseudo_label, label) and torch.equal(out.pseudo_used, used)


def test_cutmix_off_trains_on_the_plain_strong_view() -> None:
    method = build(PseudoLabel, PseudoLabelConfig, cutmix=False, threshold=0.5)
    batch = unlabeled()
    assert method.cutmix.box(batch.strong, 3) is None
    label, used = method.pseudo_labels(batch)
    with torch.no_grad():
        expected = masked_cross_entropy(method.model(batch.strong), label, used)
    assert method.unlabeled_loss(batch, 3).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_teacher_mixes_soft_targets_with_the_students_box() -> None:
    method = build(MeanTeacher, MeanTeacherConfig, cutmix=True, cutmix_p=1.0, rampup_fraction=0.0,
                   consistency_weight=1.0)
    batch, step = unlabeled(), 11
    loss = method.unlabeled_loss(batch, step)
    box = method.cutmix.box(batch.strong, step)
    with torch.no_grad():
        student = method.model(mix(batch.strong, partner(batch.strong), box)).softmax(1)
        method.teacher.train()
        probs = method.teacher(batch.image).softmax(1)
    target = mix(probs, partner(probs), box)
    assert loss.item() == pytest.approx(((student - target) ** 2).mean().item(), rel=1e-5)
    assert not math.isclose(((student - probs) ** 2).mean().item(), loss.item(), rel_tol=1e-4)
    # the labels reported for quality scoring are the teacher's on each image's own weak view
    out = method.training_step(labeled(), batch, step)
    with torch.no_grad():
        assert torch.equal(out.pseudo_label, method.teacher(batch.image).argmax(1))


def test_boxes_depend_on_the_step_only() -> None:
    method = build(PseudoLabel, PseudoLabelConfig, cutmix=True)
    images = unlabeled().strong
    assert torch.equal(method.cutmix.box(images, 5), method.cutmix.box(images, 5))
    assert any(not torch.equal(method.cutmix.box(images, 5), method.cutmix.box(images, s))
               for s in range(6, 10))
