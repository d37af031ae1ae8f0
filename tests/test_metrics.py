"""Checks for semiseg.metrics (Dice, IoU, HD95 and their empty-class rules): hand-computed
cases, a cross-check against MONAI (which semiseg.metrics must not import), and a check that
importing it pulls in neither monai nor mlflow."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

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


def _blob_labels(rng: np.random.Generator, hw: int, num_fg: int) -> np.ndarray:
    """(hw, hw) label map: each foreground class is a thresholded smoothed-noise blob field
    (irregular, often several components, often touching the image border); later classes
    overwrite earlier ones. A random threshold sometimes leaves a class empty."""
    labels = np.zeros((hw, hw), dtype=np.int64)
    for c in range(1, num_fg + 1):
        field = gaussian_filter(rng.standard_normal((hw, hw)), sigma=rng.uniform(2.0, 5.0))
        labels[field > rng.uniform(0.5, 2.5) * field.std()] = c
    return labels


def test_matches_monai_on_random_label_maps() -> None:
    """Per-(image, class) Dice, IoU and HD95 equal MONAI's compute_dice / compute_iou /
    compute_hausdorff_distance(percentile=95) wherever our conventions do not override them
    (both empty -> NaN, one empty -> 0 / image diagonal; those are tested above)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    rng = np.random.default_rng(1234)
    names = ["background", "a", "b", "c"]
    num_classes = len(names)
    compared = 0
    for _ in range(20):
        target = _blob_labels(rng, 48, num_classes - 1)
        # The prediction is a perturbed target (the target shifted by a few pixels, with
        # blob-shaped patches replaced by another random map: realistic partial overlap) or,
        # sometimes, an unrelated map (little or no overlap, large distances).
        pred = _blob_labels(rng, 48, num_classes - 1)
        if rng.random() < 0.75:
            shifted = np.roll(target, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
            noise = gaussian_filter(rng.standard_normal((48, 48)), sigma=3.0)
            keep = noise > np.quantile(noise, rng.uniform(0.1, 0.4))
            pred = np.where(keep, shifted, pred)
        p_t = torch.from_numpy(pred)[None]
        t_t = torch.from_numpy(target)[None]
        ours = segmentation_metrics(p_t, t_t, names)

        p1 = torch.nn.functional.one_hot(p_t, num_classes).permute(0, 3, 1, 2).float()
        t1 = torch.nn.functional.one_hot(t_t, num_classes).permute(0, 3, 1, 2).float()
        dice = compute_dice(p1, t1, include_background=False, ignore_empty=False)[0].numpy()
        iou = compute_iou(p1, t1, include_background=False, ignore_empty=False)[0].numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd95 = compute_hausdorff_distance(p1, t1, include_background=False,
                                              percentile=95)[0].numpy()
        for c, name in enumerate(names[1:]):
            if not ((pred == c + 1).any() and (target == c + 1).any()):
                continue  # excluded / overridden by our conventions
            compared += 1
            np.testing.assert_allclose(ours[f"dice/{name}"], dice[c], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ours[f"iou/{name}"], iou[c], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ours[f"hd95/{name}"], hd95[c], rtol=1e-5, atol=1e-4)
    assert compared >= 40  # the random maps really exercise the comparison


def test_import_pulls_in_neither_monai_nor_mlflow() -> None:
    """semiseg.engine imports semiseg.metrics and must not import mlflow; any monai import
    does (monai/__init__ loads monai.handlers.mlflow_handler)."""
    code = ("import semiseg.metrics, sys; "
            "assert 'mlflow' not in sys.modules and 'monai' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'monai'))[:5]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
