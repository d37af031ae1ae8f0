"""Per-case (3D) Dice, IoU and HD95 in mm for volume datasets.

A volume dataset (SegData.volumes set: nifti, nnunet) is trained on 2D slices, but peers score
it per 3D case: nnU-Net's evaluation (MIC-DKFZ/nnUNet, nnunetv2/evaluation/evaluate_predictions.py,
one Dice per case and class) and UniMatch's ACDC evaluation (LiheYoung/UniMatch,
more-scenarios/medical/unimatch.py: one Dice per val volume and class, averaged over volumes). Slice
scores are not comparable: a slice with 3 pixels of a structure weighs as much as one with 3000,
an empty slice predicted empty is skipped, and a slice HD95 never looks along the third axis.

So the predicted slices of each val / test case are stacked back into its volume at the
training resolution (slices in their order along the slice axis) and scored there:

* Dice and IoU per (case, class) over voxels. Class absent from both the prediction and the
  target of a case: excluded (NaN). Exactly one empty: Dice = IoU = 0.
* HD95 per (case, class) in mm, from the case's voxel spacing after the resize
  (`semiseg.metrics.hd95`: MONAI's definition, scipy's EDT with `sampling=spacing`). Both
  empty: NaN. Exactly one empty: the diagonal of the case's volume in mm, the largest distance
  two of its voxels can have, as the 2D scores use the image diagonal in pixels.
* A class's value is the nanmean over cases, and `<metric>_mean` the nanmean over foreground
  classes of those: the 2D conventions of semiseg.metrics, per case instead of per slice.

Deviations from nnU-Net's evaluation: the volume is the training-resolution stack (2D-resized
slices), not the prediction resampled to the original image grid; and a class empty in both
gets NaN (nnU-Net: NaN too, unless asked to count it as 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from semiseg.errors import DatasetError
from semiseg.metrics import _nanmean, hd95

_KINDS = ("dice", "iou", "hd95")


@dataclass(frozen=True)
class VolumeLayout:
    """Per dataset image, its case and slice index; per case, its slice count and voxel spacing
    in mm in the order of the stacked (Z, H, W) volume: (slice, rows, columns)."""

    volume_of: tuple[str, ...]
    z: tuple[int, ...]
    slices: dict[str, int]
    spacing: dict[str, tuple[float, float, float]]

    @classmethod
    def from_data(cls, data: Any) -> VolumeLayout | None:
        """The layout of a volume dataset (SegData.volumes, a SliceOrigin), None for a 2D one.
        Refuses a case whose slice indices are not 0..depth-1: a missing slice would be
        stacked away and every distance across it shortened."""
        origin = getattr(data, "volumes", None)
        if origin is None:
            return None
        z_of: dict[str, list[int]] = {}
        for volume, z in zip(origin.volume, origin.z):
            z_of.setdefault(volume, []).append(int(z))
        for volume, zs in z_of.items():
            if sorted(zs) != list(range(len(zs))):
                raise DatasetError(f"{data.source}: volume {volume} has slice indices "
                                 f"{sorted(zs)[:6]}...; expected 0..{len(zs) - 1}, every slice once")
        spacing = {}
        for volume in z_of:
            rows, cols, between = (float(s) for s in origin.spacing[volume])
            spacing[volume] = (between, rows, cols)
        return cls(tuple(origin.volume), tuple(int(z) for z in origin.z),
                   {v: len(zs) for v, zs in z_of.items()}, spacing)


def assemble(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
             layout: VolumeLayout) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(case, pred volume, target volume) per case of a subset, each (Z, H, W) with the slices
    in z order. `index` holds the subset's dataset indices; every slice of a case must be in it
    (splits never cut a group, and a case lies in one group)."""
    members: dict[str, list[tuple[int, int]]] = {}
    for pos, i in enumerate(index.cpu().tolist()):
        members.setdefault(layout.volume_of[i], []).append((layout.z[i], pos))
    pred_np, target_np = pred.detach().cpu().numpy(), target.detach().cpu().numpy()
    cases = []
    for case, slices in members.items():
        if len(slices) != layout.slices[case]:
            raise ValueError(f"case {case}: {len(slices)} of its {layout.slices[case]} slices "
                             "are in this subset; a split must keep every case whole")
        positions = [pos for _, pos in sorted(slices)]
        cases.append((case, pred_np[positions], target_np[positions]))
    return cases


def case_scores(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float],
                num_classes: int) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 (mm) of each foreground class of one case, as (C - 1,) arrays;
    `pred` and `target` are (Z, H, W) label volumes (see the module docstring)."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"case_scores: pred {pred.shape} and target {target.shape} must be "
                         "(Z, H, W) label volumes of one shape")
    diagonal = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(pred.shape, spacing)))
    out = {k: np.full(num_classes - 1, np.nan) for k in _KINDS}
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        area_p, area_t = int(p.sum()), int(t.sum())
        if area_p == 0 and area_t == 0:
            continue  # excluded
        inter = int(np.count_nonzero(p & t))
        out["dice"][c - 1] = 2.0 * inter / (area_p + area_t)
        out["iou"][c - 1] = inter / (area_p + area_t - inter)
        out["hd95"][c - 1] = hd95(p, t, tuple(spacing)) if area_p and area_t else diagonal
    return out


def volume_metrics(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                   layout: VolumeLayout, classes: Sequence[str]
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-class and mean Dice / IoU / HD95 (mm) over the cases of a subset, and one row per
    case: {"case", "slices", "spacing_mm" ([slice, rows, columns]), "<metric>/<class>" for
    dice, iou and hd95 (mm), "dice_mean", "hd95_mean"}."""
    names = list(classes)[1:]
    rows, values = [], {k: [] for k in _KINDS}
    for case, p, t in assemble(pred, target, index, layout):
        spacing = layout.spacing[case]
        scores = case_scores(p, t, spacing, len(classes))
        row: dict[str, Any] = {"case": case, "slices": int(p.shape[0]), "spacing_mm": list(spacing)}
        for kind in _KINDS:
            values[kind].append(scores[kind])
            row.update({f"{kind}/{name}": float(v) for name, v in zip(names, scores[kind])})
        row["dice_mean"] = float(_nanmean(scores["dice"]))
        row["hd95_mean"] = float(_nanmean(scores["hd95"]))
        rows.append(row)
    if not rows:
        raise ValueError("volume_metrics: the subset holds no case")
    metrics: dict[str, float] = {}
    for kind in _KINDS:
        per_class = _nanmean(np.stack(values[kind]), axis=0)
        metrics.update({f"{kind}/{name}": float(v) for name, v in zip(names, per_class)})
        metrics[f"{kind}_mean"] = float(_nanmean(per_class))
    return metrics, rows
