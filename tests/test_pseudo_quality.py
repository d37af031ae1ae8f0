"""PseudoLabelScore on hand-computed cases. tests/test_engine.py already covers the perfect
match, half coverage with correct labels, all-wrong labels and the empty score; these add Dice
for partial matches, coverage at arbitrary fractions, and how counts accumulate."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.pseudo_quality import PseudoLabelScore

HIDDEN = torch.tensor([[[0, 1, 1, 2],
                        [2, 2, 0, 1]]])
PSEUDO = torch.tensor([[[0, 1, 2, 2],
                        [2, 1, 0, 0]]])


def test_partial_match_hand_computed_dice() -> None:
    """class 1: pseudo 2 px, truth 3 px, overlap 1 -> 2/5; class 2: 3, 3, overlap 2 -> 4/6.
    Background is not averaged in, nor is class 3 (in neither)."""
    score = PseudoLabelScore(4)
    score.update(PSEUDO, None, HIDDEN)
    out = score.compute()
    assert out["pseudo/dice"] == pytest.approx((2 / 5 + 4 / 6) / 2)
    assert out["pseudo/coverage"] == 1.0
    assert score.inter.tolist() == [2, 1, 2, 0]
    assert score.pred.tolist() == [3, 2, 3, 0]
    assert score.true.tolist() == [2, 3, 3, 0]


def test_only_used_pixels_are_scored_and_coverage_is_their_fraction() -> None:
    used = torch.tensor([[[True, True, False, True],
                          [False, True, True, True]]])
    # used pixels: (pseudo, truth) = (0,0) (1,1) (2,2) (1,2) (0,0) (0,1)
    # class 1: pred 2, true 2, overlap 1 -> 1/2; class 2: pred 1, true 2, overlap 1 -> 2/3
    score = PseudoLabelScore(3)
    score.update(PSEUDO, used, HIDDEN)
    out = score.compute()
    assert out["pseudo/coverage"] == pytest.approx(6 / 8)
    assert out["pseudo/dice"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_coverage_three_sixteenths() -> None:
    hidden = torch.randint(0, 3, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    used = torch.zeros(1, 4, 4, dtype=torch.bool)
    used[0, 0, :3] = True
    score = PseudoLabelScore(3)
    score.update(hidden, used, hidden)
    assert score.compute()["pseudo/coverage"] == pytest.approx(3 / 16)


def test_counts_accumulate_before_dice_is_taken() -> None:
    """Two batches: Dice is computed from the summed counts, not averaged per batch.
    Batch A (class 1 right on 1 px), batch B (class 1: predicted on 3 px, truly on 1, no
    overlap): pred 1 + 3, true 1 + 1, overlap 1 -> 2/6. Per-batch averaging would give 1/2."""
    score = PseudoLabelScore(2)
    score.update(torch.tensor([[1, 0]]), None, torch.tensor([[1, 0]]))
    score.update(torch.tensor([[1, 1, 1, 0]]), None, torch.tensor([[0, 0, 0, 1]]))
    out = score.compute()
    assert out["pseudo/dice"] == pytest.approx(2 / 6)
    assert out["pseudo/coverage"] == 1.0


def test_coverage_accumulates_over_batches_of_different_sizes() -> None:
    score = PseudoLabelScore(2)
    hidden = torch.ones(1, 2, 2, dtype=torch.long)
    score.update(hidden, torch.tensor([[[True, False], [False, False]]]), hidden)  # 1 of 4
    hidden = torch.ones(1, 4, 4, dtype=torch.long)
    score.update(hidden, torch.ones(1, 4, 4, dtype=torch.bool), hidden)             # 16 of 16
    assert score.compute()["pseudo/coverage"] == pytest.approx(17 / 20)


def test_background_only_gives_nan_dice() -> None:
    score = PseudoLabelScore(3)
    zeros = torch.zeros(1, 3, 3, dtype=torch.long)
    score.update(zeros, None, zeros)
    out = score.compute()
    assert math.isnan(out["pseudo/dice"])
    assert out["pseudo/coverage"] == 1.0


def test_nothing_used_gives_nan_dice_and_zero_coverage() -> None:
    score = PseudoLabelScore(3)
    score.update(PSEUDO, torch.zeros_like(PSEUDO, dtype=torch.bool), HIDDEN)
    out = score.compute()
    assert out["pseudo/coverage"] == 0.0
    assert math.isnan(out["pseudo/dice"])


def test_class_predicted_but_absent_counts_as_zero() -> None:
    """Class 2 is predicted on one pixel but absent from the truth: its Dice 0 is averaged in."""
    score = PseudoLabelScore(3)
    score.update(torch.tensor([[1, 1, 2, 0]]), None, torch.tensor([[1, 1, 0, 0]]))
    assert score.compute()["pseudo/dice"] == pytest.approx((1.0 + 0.0) / 2)
