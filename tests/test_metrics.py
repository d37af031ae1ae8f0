"""Hand-computed checks for semiseg.metrics (Dice, IoU, HD95 and their empty-class rules)."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.metrics import MetricAccumulator, segmentation_metrics

NAMES = ["background", "organ"]


def _square(top: int, left: int, size: int = 4, hw: int = 12, label: int = 1) -> torch.Tensor:
    m = torch.zeros(1, hw, hw, dtype=torch.long)
    m[0, top : top + size, left : left + size] = label
    return m


def test_shifted_square_dice_iou_hd95() -> None:
    # 4x4 squares, B shifted right by 3: overlap is one 4x1 column = 4 px.
    # Dice = 2*4 / (16 + 16) = 0.25; IoU = 4 / (16 + 16 - 4) = 4/28.
    # Edge distances A->B: left column 3 (x4), cols 1/2 top+bottom 2,2,1,1, col 3 -> 0 (x4);
    # so more than 5% of distances equal 3 and HD95 = 3 (same by symmetry for B->A).
    out = segmentation_metrics(_square(2, 1), _square(2, 4), NAMES)
    assert out["dice/organ"] == pytest.approx(0.25)
    assert out["iou/organ"] == pytest.approx(4 / 28)
    assert out["hd95/organ"] == pytest.approx(3.0)
    assert out["dice_mean"] == pytest.approx(0.25)


def test_perfect_prediction() -> None:
    m = _square(3, 3)
    out = segmentation_metrics(m, m.clone(), NAMES)
    assert out == {
        "dice/organ": 1.0, "iou/organ": 1.0, "hd95/organ": 0.0,
        "dice_mean": 1.0, "iou_mean": 1.0, "hd95_mean": 0.0,
    }


def test_disjoint_gives_zero_overlap() -> None:
    out = segmentation_metrics(_square(0, 0), _square(8, 8), NAMES)
    assert out["dice/organ"] == 0.0
    assert out["iou/organ"] == 0.0


def test_parallel_lines_hd95() -> None:
    # Two 1-px-wide horizontal lines over the same columns, 5 rows apart: every edge
    # pixel is exactly 5 from the other line, so HD95 = 5.
    pred = torch.zeros(1, 10, 10, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 2, 2:8] = 1
    target[0, 7, 2:8] = 1
    assert segmentation_metrics(pred, target, NAMES)["hd95/organ"] == pytest.approx(5.0)


def test_class_absent_in_both_is_excluded_not_one() -> None:
    # Image 0: half-overlap (Dice 0.5); image 1: empty in both -> excluded, so the class
    # value stays 0.5 (counting the empty image as 1 would give 0.75).
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 0:2, 0:4] = 1   # 8 px
    target[0, 0:2, 2:6] = 1  # 8 px, overlap 4 -> Dice 8/16, IoU 4/12
    out = segmentation_metrics(pred, target, NAMES)
    assert out["dice/organ"] == pytest.approx(0.5)
    assert out["iou/organ"] == pytest.approx(1 / 3)


def test_class_absent_everywhere_is_nan_and_ignored_by_means() -> None:
    names = ["background", "a", "b"]
    m = _square(2, 2, hw=8)  # only class 1 present
    out = segmentation_metrics(m, m.clone(), names)
    assert math.isnan(out["dice/b"]) and math.isnan(out["iou/b"]) and math.isnan(out["hd95/b"])
    assert out["dice_mean"] == 1.0 and out["iou_mean"] == 1.0 and out["hd95_mean"] == 0.0


def test_one_empty_hd95_is_image_diagonal() -> None:
    pred = torch.zeros(1, 7, 9, dtype=torch.long)
    target = pred.clone()
    target[0, 1:3, 1:3] = 1
    out = segmentation_metrics(pred, target, NAMES)
    assert out["hd95/organ"] == pytest.approx(math.hypot(6, 8))  # = 10, finite
    assert out["dice/organ"] == 0.0  # a missed structure counts, it is not excluded
    # And the other way round (false positive on an empty target).
    out = segmentation_metrics(target, pred, NAMES)
    assert out["hd95/organ"] == pytest.approx(10.0)
    assert out["dice/organ"] == 0.0


def test_multiclass_means_exclude_background() -> None:
    names = ["background", "a", "b"]
    pred = torch.zeros(1, 12, 12, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 0:4, 0:4] = 1
    target[0, 0:4, 0:4] = 1   # class a perfect: Dice 1
    pred[0, 6:10, 0:4] = 2
    target[0, 6:10, 8:12] = 2  # class b disjoint: Dice 0
    out = segmentation_metrics(pred, target, names)
    assert out["dice/a"] == 1.0 and out["dice/b"] == 0.0
    assert out["dice_mean"] == pytest.approx(0.5)  # background (Dice 192/224 here) not averaged in
    assert "dice/background" not in out
    assert set(out) == {f"{k}/{n}" for k in ("dice", "iou", "hd95") for n in ("a", "b")} | {
        "dice_mean", "iou_mean", "hd95_mean"
    }


def test_accumulator_matches_single_call_on_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    names = ["background", "a", "b", "c"]
    pred = torch.randint(0, 4, (5, 16, 16), generator=g)
    target = torch.randint(0, 4, (5, 16, 16), generator=g)
    target[3] = 0  # some empty classes for the NaN paths
    acc = MetricAccumulator(names)
    acc.update(pred[:1], target[:1])  # batch of 1
    acc.update(pred[1:], target[1:])
    whole = segmentation_metrics(pred, target, names)
    parts = acc.compute()
    assert parts.keys() == whole.keys()
    for key in whole:
        assert parts[key] == pytest.approx(whole[key], nan_ok=True), key
    assert segmentation_metrics(pred, target, names) == whole  # deterministic


def test_bad_inputs_raise() -> None:
    m = _square(0, 0)
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(m, m[:, :5], NAMES)
    with pytest.raises(ValueError, match="integer label map"):
        segmentation_metrics(m.float(), m, NAMES)
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        segmentation_metrics(m * 2, m, NAMES)
    with pytest.raises(ValueError, match="before any images"):
        MetricAccumulator(NAMES).compute()
