"""What every dataset yields: 2D images + integer masks + a class map + split groups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from semiseg.data_config import DataConfig
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
    positions: optional, per image, its place along an axis the groups are ordered by (the
        slice index z of a slice-block dataset). When given, splits are stratified by position
        (`semiseg.data.splits`); None (patients, phantoms) keeps plain seeded draws.
    """

    images: np.ndarray
    masks: np.ndarray
    groups: list[str]
    ids: list[str]
    classes: list[str]
    source: str
    positions: list[float] | None = None

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
        if self.positions is not None:
            self.positions = list(self.positions)  # an array is accepted, stored as a list
            self._check_positions(n)
        if len(set(self.ids)) != n:
            seen: set[str] = set()
            dups = sorted({i for i in self.ids if i in seen or seen.add(i)})
            raise DatasetError(
                f"{self.source}: image ids are not unique ({', '.join(dups[:5])}); "
                "expected one image per id"
            )
        bad = self.masks.max() if self.masks.size else 0
        if bad >= len(self.classes) or self.masks.min() < 0:
            raise DatasetError(
                f"{self.source}: mask value {int(bad)} is outside the class map "
                f"0..{len(self.classes) - 1} ({', '.join(self.classes)})"
            )

    def _check_positions(self, n: int) -> None:
        if len(self.positions) != n:
            raise DatasetError(
                f"{self.source}: positions has {len(self.positions)} entries; expected one per "
                f"image ({n})"
            )
        try:
            values = np.asarray(self.positions, dtype=np.float64)
        except (TypeError, ValueError):
            values = np.empty(0)
        if values.shape != (n,):
            raise DatasetError(f"{self.source}: positions {list(self.positions)[:3]}...: expected "
                               "one number per image (e.g. its slice index)")
        if not np.isfinite(values).all():
            bad = self.ids[int(np.flatnonzero(~np.isfinite(values))[0])]
            raise DatasetError(f"{self.source}: position of image {bad} is not finite; "
                               "expected a number (e.g. its slice index)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DatasetBuilder = Callable[[DataConfig], SegData]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def load_dataset(cfg: DataConfig) -> SegData:
    """Build the dataset that `cfg.name` names."""
    return DATASETS.get(cfg.name)(cfg)


def check_classes_present(
    masks: np.ndarray, classes: list[str], root: Path, spec: Path | None
) -> None:
    """Refuse a class map naming a foreground class that no mask in the dataset contains.

    A class missing from *some* masks is normal and accepted. One missing from *all* of them
    cannot be learned, its Dice is NaN in every run, and the foreground means silently skip
    it, so a sweep would report over fewer classes than the user declared. It is almost
    always a wrong class map or a wrong mask encoding, so it is an error, not a warning.
    """
    present = np.bincount(masks.ravel(), minlength=len(classes)) > 0
    absent = [f"{classes[i]!r} (value {i})" for i in range(1, len(classes)) if not present[i]]
    if absent:
        where = f"the classes in {spec}" if spec else "the default class map"
        raise DatasetError(
            f"{root}: class {', '.join(absent)} appears in no mask of the {len(masks)} images; "
            f"expected every foreground class of {where} in at least one mask "
            "(remove it from 'classes' or check the mask values)"
        )


def normalise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per image (float32); a constant image becomes all zeros."""
    image = image.astype(np.float32)
    std = float(image.std())
    return (image - image.mean()) / std if std > 1e-8 else np.zeros_like(image)
