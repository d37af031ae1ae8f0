"""What every dataset yields: 2D images + integer masks + a class map + split groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from semiseg.config import DataConfig
from semiseg.errors import DatasetError
from semiseg.registry import Registry


@dataclass
class SegData:
    """A loaded dataset, all images at one size.

    images: (N, H, W) float32, each normalised to zero mean and unit variance.
    masks:  (N, H, W) int64 labels, 0 = background, values index `classes`.
    groups: per image, the patient / volume / slice-block it belongs to; splits never cut one.
    ids:    per image, a stable readable identifier (file stem, "patient001_frame01_z03", ...).
    classes: class names, `classes[0]` the background.
    """

    images: np.ndarray
    masks: np.ndarray
    groups: list[str]
    ids: list[str]
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise DatasetError(f"{self.source}: the dataset has no images")
        if self.masks.shape != self.images.shape:
            raise DatasetError(
                f"{self.source}: masks {self.masks.shape} do not match images {self.images.shape}"
            )
        if len(self.groups) != n or len(self.ids) != n:
            raise DatasetError(f"{self.source}: groups/ids must have one entry per image ({n})")
        if len(set(self.ids)) != n:
            raise DatasetError(f"{self.source}: image ids are not unique")
        bad = self.masks.max() if self.masks.size else 0
        if bad >= len(self.classes) or self.masks.min() < 0:
            raise DatasetError(
                f"{self.source}: mask value {int(bad)} is outside the class map "
                f"0..{len(self.classes) - 1} ({', '.join(self.classes)})"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DatasetBuilder = Callable[[DataConfig], SegData]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def load_dataset(cfg: DataConfig) -> SegData:
    """Build the dataset that `cfg.name` names."""
    return DATASETS.get(cfg.name)(cfg)


def normalise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per image (float32); a constant image becomes all zeros."""
    image = image.astype(np.float32)
    std = float(image.std())
    return (image - image.mean()) / std if std > 1e-8 else np.zeros_like(image)
