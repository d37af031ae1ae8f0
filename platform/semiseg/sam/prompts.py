"""Prompts from a coarse label map, as in Keuth et al. 2024 ("SAM Carries the Burden",
arXiv 2411.12602): for each foreground class, its connected component(s) give a box (their
extent) and a positive point (the most interior pixel, by distance transform); the positive
points of the other classes are the negative points. Pure numpy/scipy.

Component policy (`components`):
- "largest": only the largest connected component of each class: a box around everything a
  coarse model predicts would swallow its speckle;
- "all": every component with at least `min_size` pixels gets its own prompt, for classes that
  are really several blobs, such as left and right lung (semiseg's default, sam.components).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COMPONENT_POLICIES = ("largest", "all")


@dataclass(frozen=True)
class Prompt:
    """One SAM query. Coordinates are pixels of the original image, x then y (SAM's order)."""

    class_id: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (inclusive pixel extent)
    point: tuple[float, float]
    negatives: tuple[tuple[float, float], ...] = ()

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, 2) coordinates and (K,) labels: the positive point first, then the negatives."""
        coords = np.array([self.point, *self.negatives], dtype=np.float32)
        labels = np.array([1] + [0] * len(self.negatives), dtype=np.int64)
        return coords, labels


def components(mask: np.ndarray, policy: str = "largest", min_size: int = 1) -> list[np.ndarray]:
    """Boolean masks of the connected components of `mask` that the policy keeps, largest first."""
    if policy not in COMPONENT_POLICIES:
        raise ValueError(f"component policy {policy!r}: expected one of {COMPONENT_POLICIES}")
    labelled, count = ndimage.label(mask)
    if count == 0:
        return []
    sizes = np.bincount(labelled.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    if policy == "largest":
        order = order[:1]
    return [labelled == i + 1 for i in order if sizes[i] >= min_size]


def box_of(component: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(component)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def interior_point(component: np.ndarray) -> tuple[float, float]:
    """The pixel farthest from the component's border (first such pixel in raster order)."""
    distance = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def prompts_from_mask(coarse: np.ndarray, num_classes: int, policy: str = "largest",
                      min_size: int = 1) -> list[Prompt]:
    """Prompts for every foreground class present in `coarse` (H, W integer labels).

    Classes absent from the coarse mask get no prompt; an all-background mask gives [].
    """
    found: list[tuple[int, tuple[float, float, float, float], tuple[float, float]]] = []
    for class_id in range(1, num_classes):
        for comp in components(coarse == class_id, policy, min_size):
            found.append((class_id, box_of(comp), interior_point(comp)))
    prompts = []
    for class_id, box, point in found:
        negatives = tuple(p for c, _, p in found if c != class_id)
        prompts.append(Prompt(class_id, box, point, negatives))
    return prompts
