"""Per-class and mean Dice, IoU and HD95 for 2D multi-class label maps.

Conventions (they change the numbers, so they are fixed here and tested):

* Inputs are (N, H, W) integer label maps with values in ``[0, len(class_names))``;
  ``class_names[0]`` is background and never scored.
* Dice and IoU are computed per (image, class). When a class is absent from *both* the
  prediction and the target of an image, that (image, class) is excluded (NaN), not counted
  as 1 (which would reward predicting nothing) nor 0. When exactly one of them is empty,
  Dice = IoU = 0.
* HD95 is the 95th-percentile symmetric Hausdorff distance between mask edges, in pixels,
  computed on CPU. Both empty -> excluded (NaN). Exactly one empty -> the image diagonal
  ``sqrt((H - 1)**2 + (W - 1)**2)``, the largest distance two pixels of the image can have:
  a finite worst case, so means stay finite and a missed structure is still penalised.
* Per-class value = nanmean over images. A class absent from every image gets NaN, and the
  means over foreground classes (``dice_mean`` etc.) are nanmeans that ignore it. If every
  value is NaN the mean is NaN.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt

# MONAI is deliberately NOT imported here, not even lazily: importing any monai submodule
# runs monai/__init__.py, which loads monai.handlers and with it mlflow_handler ->
# `import mlflow`. semiseg.engine imports this module and must stay free of mlflow/ray.
# The code below reimplements exactly what we used from monai.metrics (compute_dice,
# compute_iou, compute_hausdorff_distance(percentile=95)); tests/test_metrics.py
# cross-checks it against MONAI on random label maps.

_KINDS = ("dice", "iou", "hd95")
_HD_PERCENTILE = 95.0


def _check_inputs(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            "pred and target must both be (N, H, W) label maps of the same shape; got "
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    for name, t in (("pred", pred), ("target", target)):
        # A float tensor here is almost always logits/probabilities passed by mistake.
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be an integer label map, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f"{name} has labels in [{int(t.min())}, {int(t.max())}], "
                f"expected [0, {num_classes - 1}] for {num_classes} classes"
            )


def _confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) label maps -> (N, C, C) int64 pixel counts, [n, pred class, target class]."""
    n = pred.shape[0]
    idx = pred.reshape(n, -1).long() * num_classes + target.reshape(n, -1).long()
    idx = idx + torch.arange(n).unsqueeze(1) * num_classes * num_classes
    counts = torch.bincount(idx.reshape(-1), minlength=n * num_classes * num_classes)
    return counts.reshape(n, num_classes, num_classes)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Edge pixels as MONAI's get_mask_edges defines them (no spacing): the mask XOR its
    binary erosion with scipy's default cross-shaped element. Pixels outside the array
    count as background (border_value=0), so foreground on the image border is edge."""
    return binary_erosion(mask) ^ mask


def _directed_percentile(from_edges: np.ndarray, to_edges: np.ndarray,
                         spacing: tuple[float, ...] | None = None) -> float:
    """95th percentile (np.percentile linear interpolation, as torch.quantile in MONAI) of
    the Euclidean distances from every pixel of ``from_edges`` to the nearest of ``to_edges``,
    in units of ``spacing`` per axis (None: pixels)."""
    # EDT of the complement is exact: distance from each pixel to the nearest zero, i.e. to
    # the nearest edge pixel of the other shape (MONAI uses a KD-tree; same distances).
    dist = distance_transform_edt(~to_edges, sampling=spacing)[from_edges]
    return float(np.percentile(dist, _HD_PERCENTILE))


def hd95(pred_mask: np.ndarray, target_mask: np.ndarray,
         spacing: tuple[float, ...] | None = None) -> float:
    """Symmetric HD95 between two non-empty boolean masks of any dimension (2D slices, 3D
    cases), in the units of ``spacing`` (one voxel size per axis, e.g. mm; None: voxels).

    Same definition as the 2D scores here, and as MONAI's
    compute_hausdorff_distance(percentile=95, spacing=...): edges are the mask XOR its erosion
    with scipy's default cross (4-connected in 2D, 6-connected in 3D), distances are from
    scipy's EDT with ``sampling=spacing``, and the result is the larger directed percentile.
    Both masks must hold foreground (the empty cases are each caller's convention)."""
    if pred_mask.shape != target_mask.shape:
        raise ValueError(f"hd95: masks {pred_mask.shape} and {target_mask.shape} differ in shape")
    if spacing is not None and len(spacing) != pred_mask.ndim:
        raise ValueError(f"hd95: spacing {tuple(spacing)} has {len(spacing)} entries; expected "
                         f"one per axis of the {pred_mask.ndim}D masks")
    if not (pred_mask.any() and target_mask.any()):
        raise ValueError("hd95: both masks must hold foreground; an empty mask has no distance")
    # The crop of _hd95, along every axis: nothing outside the union's box is foreground.
    union = pred_mask | target_mask
    box = tuple(slice(idx[0], idx[-1] + 1) for idx in
                (np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != ax)))
                 for ax in range(union.ndim)))
    edges_p, edges_t = _edges(pred_mask[box]), _edges(target_mask[box])
    return max(_directed_percentile(edges_p, edges_t, spacing),
               _directed_percentile(edges_t, edges_p, spacing))


def _hd95(pred_mask: np.ndarray, target_mask: np.ndarray) -> float:
    """Symmetric HD95 between two non-empty 2D boolean masks, in pixels (unit spacing):
    max of the two directed 95th percentiles, as compute_hausdorff_distance(percentile=95,
    directed=False)."""
    # Crop to the bounding box of the union. Nothing outside it is foreground, so erosion
    # (which treats outside-the-array as background) yields the same edges, and every edge
    # pixel lies inside it, so the distances are unchanged; it only saves work.
    union = pred_mask | target_mask
    rows = np.flatnonzero(union.any(1))
    cols = np.flatnonzero(union.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    edges_p = _edges(pred_mask[box])
    edges_t = _edges(target_mask[box])
    return max(_directed_percentile(edges_p, edges_t), _directed_percentile(edges_t, edges_p))


def _per_image(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> dict[str, np.ndarray]:
    """Per-(image, foreground class) Dice, IoU and HD95 as (N, C - 1) float64 arrays."""
    # Everything on CPU: HD95 needs scipy anyway, and integer counts keep results exact
    # and deterministic regardless of where the model ran.
    pred = pred.detach().cpu()
    target = target.detach().cpu()
    h, w = pred.shape[-2:]

    # Areas and intersections from one per-image confusion matrix, dropping background.
    conf = _confusion(pred, target, num_classes).double().numpy()
    inter = np.diagonal(conf, axis1=1, axis2=2)[:, 1:]  # (N, C - 1)
    pred_area = conf.sum(2)[:, 1:]
    target_area = conf.sum(1)[:, 1:]
    pred_has = pred_area > 0
    target_has = target_area > 0
    both_empty = ~pred_has & ~target_has
    one_empty = pred_has ^ target_has

    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * inter / (pred_area + target_area)
        iou = inter / (pred_area + target_area - inter)
    hd95 = np.full(dice.shape, np.nan)

    pred_np = pred.numpy()
    target_np = target.numpy()
    for i, c in zip(*np.nonzero(pred_has & target_has)):
        hd95[i, c] = _hd95(pred_np[i] == c + 1, target_np[i] == c + 1)

    # Both empty: 0/0 above -> excluded (NaN). One empty: 0/area = 0 for Dice and IoU.
    dice[both_empty] = np.nan
    iou[both_empty] = np.nan
    hd95[one_empty] = math.hypot(h - 1, w - 1)
    return {"dice": dice, "iou": iou, "hd95": hd95}


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """np.nanmean without the 'Mean of empty slice' warning: all-NaN slices give NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


class MetricAccumulator:
    """Accumulates per-image, per-class scores batch by batch; see the module docstring.

    Keeps one small (N, C - 1) array per metric, never the images, so evaluation memory does
    not grow with image size. ``compute()`` over several ``update()`` calls equals one
    ``segmentation_metrics`` call on the concatenated batches.
    """

    def __init__(self, class_names: list[str]) -> None:
        if len(class_names) < 2:
            raise ValueError(
                f"class_names needs background plus at least one class, got {class_names!r}"
            )
        self.class_names = list(class_names)
        self._values: dict[str, list[np.ndarray]] = {k: [] for k in _KINDS}

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self._values["dice"])

    def per_image(self, kind: str = "dice") -> np.ndarray:
        """(N, C - 1) per-(image, foreground class) values of `kind` in update() order; NaN
        where an image excludes the class (see the module docstring). For paired statistics."""
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {', '.join(_KINDS)}")
        if self.num_images == 0:
            return np.zeros((0, len(self.class_names) - 1))
        return np.concatenate(self._values[kind])

    def reset(self) -> None:
        self._values = {k: [] for k in _KINDS}

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Score one batch of (N, H, W) label maps; N may be 1."""
        num_classes = len(self.class_names)
        _check_inputs(pred, target, num_classes)
        if pred.shape[0] == 0:
            return
        for kind, values in _per_image(pred, target, num_classes).items():
            self._values[kind].append(values)

    def compute(self) -> dict[str, float]:
        """Per-class f"{metric}/{name}" and f"{metric}_mean" over foreground classes."""
        if self.num_images == 0:
            raise ValueError("MetricAccumulator.compute() called before any images were added")
        out: dict[str, float] = {}
        for kind in _KINDS:
            per_class = _nanmean(np.concatenate(self._values[kind]), axis=0)
            for name, value in zip(self.class_names[1:], per_class):
                out[f"{kind}/{name}"] = float(value)
            out[f"{kind}_mean"] = float(_nanmean(per_class))
        return out


def segmentation_metrics(
    pred: torch.Tensor, target: torch.Tensor, class_names: list[str]
) -> dict[str, float]:
    """Dice, IoU and HD95 per foreground class and their means for one set of label maps.

    ``pred`` and ``target`` are (N, H, W) integer label maps; ``class_names[0]`` is background.
    See the module docstring for how empty classes and HD95 worst cases are handled.
    """
    acc = MetricAccumulator(class_names)
    acc.update(pred, target)
    return acc.compute()
