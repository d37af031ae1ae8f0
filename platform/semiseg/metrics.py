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
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

_KINDS = ("dice", "iou", "hd95")


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


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) int -> (N, C, H, W) float, the layout MONAI metrics expect."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def _per_image(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> dict[str, np.ndarray]:
    """Per-(image, foreground class) Dice, IoU and HD95 as (N, C - 1) float64 arrays."""
    # Everything on CPU: HD95 needs scipy anyway, and CPU float math keeps results
    # deterministic regardless of where the model ran.
    p = _one_hot(pred.detach().cpu(), num_classes)
    t = _one_hot(target.detach().cpu(), num_classes)
    h, w = pred.shape[-2:]

    pred_has = p[:, 1:].flatten(2).any(-1).numpy()  # (N, C - 1)
    target_has = t[:, 1:].flatten(2).any(-1).numpy()
    both_empty = ~pred_has & ~target_has
    one_empty = pred_has ^ target_has

    # ignore_empty=False gives 1.0 for both-empty and 0.0 for one-empty; we then replace
    # both-empty with NaN ourselves (MONAI's ignore_empty=True would also drop the
    # "target empty, pred not" case, hiding false positives).
    dice = compute_dice(p, t, include_background=False, ignore_empty=False).double().numpy()
    iou = compute_iou(p, t, include_background=False, ignore_empty=False).double().numpy()
    with warnings.catch_warnings():
        # MONAI warns for every empty mask (we handle those below) and about its own
        # deprecated internals; neither is actionable for callers.
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(p, t, include_background=False, percentile=95)
    hd95 = hd95.double().numpy()

    dice[both_empty] = np.nan
    iou[both_empty] = np.nan
    hd95[both_empty] = np.nan
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
