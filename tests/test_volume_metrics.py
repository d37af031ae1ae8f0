"""Per-case (3D) Dice and HD95 in mm (semiseg.volume_metrics): hand-computed tiny volumes,
anisotropic spacing, MONAI's HD95 on random volumes, the reassembly of shuffled slices, and
the engine reporting per-case metrics as test/ (2D kept as test2d/) for a NIfTI dataset."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.engine import build_trainer, fit
from semiseg.errors import DatasetError
from semiseg.metrics import hd95
from semiseg.volume_metrics import VolumeLayout, case_scores, volume_metrics

CLASSES = ["background", "a", "b", "c"]


def _points(shape: tuple[int, ...], *coords: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for c in coords:
        mask[c] = True
    return mask


def test_hd95_in_mm_follows_the_spacing_of_each_axis() -> None:
    """One voxel against two: target->pred distances are [0, d] and the 95th percentile
    (linear) is 0.95 d, where d is the second voxel's offset in mm along its own axis."""
    spacing = (4.0, 0.5, 2.0)  # (slice, rows, columns), as different as they can be
    one = _points((3, 3, 3), (0, 0, 0))
    for axis, step in enumerate(spacing):
        offset = [0, 0, 0]
        offset[axis] = 1
        two = _points((3, 3, 3), (0, 0, 0), tuple(offset))
        assert hd95(one, two, spacing) == pytest.approx(0.95 * step)
    diagonal = _points((3, 3, 3), (0, 0, 0), (1, 1, 0))
    assert hd95(one, diagonal, spacing) == pytest.approx(0.95 * math.hypot(4.0, 0.5))
    # Two planes one slice apart: every edge voxel is exactly one slice spacing away.
    low, high = np.zeros((4, 5, 5), bool), np.zeros((4, 5, 5), bool)
    low[1], high[2] = True, True
    assert hd95(low, high, (2.5, 1.0, 1.0)) == pytest.approx(2.5)
    assert hd95(low, high) == pytest.approx(1.0)  # no spacing: voxels
    with pytest.raises(ValueError, match="one per axis"):
        hd95(low, high, (1.0, 1.0))


def test_case_scores_by_hand() -> None:
    """A (2, 4, 4) case: class a overlaps, b is absent from both, c is missed."""
    target = np.zeros((2, 4, 4), dtype=np.int64)
    pred = np.zeros_like(target)
    target[:, :2, :2] = 1        # 8 voxels of a
    pred[0, :2, :2] = 1          # 4 of them ...
    pred[0, 3, 2:] = 1           # ... plus 2 false positives
    target[1, 3, 3] = 3          # c only in the target
    spacing = (5.0, 1.5, 1.5)
    scores = case_scores(pred, target, spacing, len(CLASSES))
    assert scores["dice"][0] == pytest.approx(2 * 4 / (6 + 8))
    assert scores["iou"][0] == pytest.approx(4 / (6 + 8 - 4))
    assert math.isnan(scores["dice"][1]) and math.isnan(scores["hd95"][1])  # excluded
    assert scores["dice"][2] == 0.0
    assert scores["hd95"][2] == pytest.approx(math.sqrt(5.0**2 + (3 * 1.5) ** 2 + (3 * 1.5) ** 2))


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int64)
    for c in (1, 2):
        field = gaussian_filter(rng.standard_normal(shape), sigma=(1.0, 3.0, 3.0))
        labels[field > 1.2 * field.std()] = c
    return labels


def test_hd95_matches_monai_with_anisotropic_spacing() -> None:
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(7)
    compared = 0
    for spacing in [(3.0, 0.8, 0.8), (1.0, 2.0, 0.5), (6.5, 1.25, 1.25)]:
        target = _blobs(rng, (6, 20, 20))
        pred = np.where(rng.random(target.shape) < 0.9, np.roll(target, 1, axis=2), target)
        ours = case_scores(pred, target, spacing, 3)["hd95"]
        one_hot = [torch.nn.functional.one_hot(torch.from_numpy(x)[None], 3).permute(0, 4, 1, 2, 3)
                   .float() for x in (pred, target)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monai = compute_hausdorff_distance(*one_hot, include_background=False, percentile=95,
                                               spacing=list(spacing))[0].numpy()
        for c in (1, 2):
            if (pred == c).any() and (target == c).any():
                compared += 1
                assert ours[c - 1] == pytest.approx(float(monai[c - 1]), rel=1e-5, abs=1e-4)
    assert compared >= 5


def _layout() -> VolumeLayout:
    """Cases p1 (3 slices, dataset images 0-2) and p2 (2 slices, images 3-4)."""
    return VolumeLayout(("p1", "p1", "p1", "p2", "p2"), (0, 1, 2, 0, 1), {"p1": 3, "p2": 2},
                        {"p1": (10.0, 1.0, 1.0), "p2": (2.0, 1.0, 1.0)})


def test_slices_are_put_back_in_z_order_and_averaged_per_case() -> None:
    target = torch.zeros(5, 4, 4, dtype=torch.long)
    target[0:3, 1:3, 1:3] = 1            # p1: a 3-slice column of a
    target[3, :2, :2] = 2                # p2: b in one slice
    pred = target.clone()
    pred[2] = 0                          # p1's last slice missed: Dice 2*8/(8+12)
    order = torch.tensor([4, 2, 0, 3, 1])  # a subset lists its images in any order
    metrics, rows = volume_metrics(pred[order], target[order], order, _layout(), CLASSES)
    by_case = {r["case"]: r for r in rows}
    assert by_case["p1"]["dice/a"] == pytest.approx(0.8) and by_case["p1"]["slices"] == 3
    # missing slice 2 of the column: every edge voxel of it is one 10 mm slice away, and
    # the 95th percentile of target->pred distances lands on it.
    assert by_case["p1"]["hd95/a"] == pytest.approx(10.0)
    assert math.isnan(by_case["p1"]["dice/b"])
    assert by_case["p2"]["dice/b"] == 1.0 and by_case["p2"]["hd95/b"] == 0.0
    assert by_case["p2"]["spacing_mm"] == [2.0, 1.0, 1.0]
    assert metrics["dice/a"] == pytest.approx(0.8) and metrics["dice/b"] == 1.0
    assert metrics["dice_mean"] == pytest.approx(0.9) and math.isnan(metrics["dice/c"])
    with pytest.raises(ValueError, match="case p1: 2 of its 3 slices"):
        volume_metrics(pred[:2], target[:2], torch.tensor([0, 1]), _layout(), CLASSES)


def _acdc_like(root: Path) -> Path:
    """5 patients, one (12, 8, 3) frame each at 1.5 x 1.5 x 8 mm: a bright square of class 1
    on slices 0-1 and class 2 on slice 2, so a model learns them in a step or two."""
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    for p in range(1, 6):
        folder = root / f"patient{p:03d}"
        folder.mkdir(parents=True)
        labels = np.zeros((12, 8, 3), dtype=np.uint8)
        labels[3:9, 2:6, :2], labels[4:8, 3:6, 2] = 1, 2
        image = (labels * 40.0 + np.random.default_rng(p).normal(0, 5, labels.shape))
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"patient{p:03d}_frame01.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / f"patient{p:03d}_frame01_gt.nii.gz")
    (root / "dataset.yaml").write_text("classes: [background, cavity, wall]\n")
    return root


def test_engine_scores_a_nifti_dataset_per_case_in_mm(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={_acdc_like(tmp_path)}", "data.name=nifti",
                             "data.image_size=16", "data.test_fraction=0.4", "model.base_channels=4",
                             "model.depth=1", "train.epochs=1", "train.steps_per_epoch=2",
                             "train.device=cpu", "tracking.overlays=0"])
    data = load_dataset(cfg.data)
    layout = VolumeLayout.from_data(data)
    # pad 12 x 8 to 12 x 12, resize to 16: in-plane 1.5 * 12 / 16 mm; slices stay 8 mm apart
    assert layout.spacing["patient001_frame01"] == pytest.approx((8.0, 1.125, 1.125))
    split = make_split(data, cfg.data, cfg.train.seed)
    result = fit(build_trainer(cfg, data, split, torch.device("cpu")), tmp_path / "work")
    cases = sorted({data.volumes.volume[i] for i in split.test})
    assert [r["case"] for r in result.per_case] == cases and len(cases) == 2
    for kind in ("dice", "hd95"):
        for name in ("cavity", "wall"):
            per_case = [r[f"{kind}/{name}"] for r in result.per_case]
            assert result.test_metrics[f"test/{kind}/{name}"] == pytest.approx(np.nanmean(per_case))
    assert {"test2d/dice_mean", "test_final/dice_mean", "test_final2d/dice_mean"} <= set(result.test_metrics)
    diagonal = math.sqrt((2 * 8.0) ** 2 + 2 * (15 * 1.125) ** 2)  # a missed class, in mm
    assert all(0 <= r["hd95/cavity"] <= diagonal + 1e-6 for r in result.per_case)


def test_a_case_with_a_missing_slice_is_refused() -> None:
    class Data:
        source = "fixture"
        volumes = type("Origin", (), {"volume": ["v", "v"], "z": [0, 2],
                                      "spacing": {"v": (1.0, 1.0, 3.0)}})()
    with pytest.raises(DatasetError, match=r"volume v has slice indices \[0, 2\]"):
        VolumeLayout.from_data(Data())
