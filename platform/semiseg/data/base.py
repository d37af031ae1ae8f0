"""What every dataset yields: 2D images + integer masks + a class map + split groups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from semiseg.data_config import DataConfig
from semiseg.errors import DatasetError
from semiseg.registry import Registry


@dataclass(frozen=True)
class SliceOrigin:
    """Where each 2D image of a volume dataset sits in its 3D volume, so predictions can be put
    back into volumes (per-case metrics). A volume is not a group: an ACDC patient (the group)
    has two frames (two volumes).

    volume:  per image, the id of the volume it is a slice of (nnunet: the case id).
    z:       per image, its slice index in that volume, 0..depth-1.
    spacing: per volume, mm per voxel (rows H, columns W, slice) of the slices as stored in the
        SegData, i.e. after the pad and resize to image_size.
    """

    volume: list[str]
    z: list[int]
    spacing: dict[str, tuple[float, float, float]]

    def check(self, n: int, source: str) -> None:
        if len(self.volume) != n or len(self.z) != n:
            raise DatasetError(f"{source}: volumes has {len(self.volume)} volume ids and "
                               f"{len(self.z)} slice indices; expected one of each per image ({n})")
        seen = set(zip(self.volume, self.z))
        if len(seen) != n:
            raise DatasetError(f"{source}: two images claim the same (volume, z); expected one "
                               "image per slice of a volume")
        missing = sorted(set(self.volume) - set(self.spacing))
        if missing:
            raise DatasetError(f"{source}: no voxel spacing for volume {missing[0]}; expected "
                               "one (rows, columns, slice) spacing in mm per volume")


@dataclass
class SegData:
    """A loaded dataset, all images at one size.

    images: (N, H, W) float32, or (N, C, H, W) for C input channels (multi-modal volumes).
        A builder returns raw intensities (after the resize); `load_dataset` normalises them by
        `data.normalize` (semiseg.data.normalize; default: each image, each channel, to zero
        mean and unit variance).
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
    volumes: SliceOrigin | None = None
    """Volume datasets: each image's volume, slice index and the volumes' voxel spacing."""
    channel_names: list[str] | None = None
    """The input channels' names (modalities, e.g. ["T2", "ADC"]) where the dataset names them."""
    label_unit: str = "image"
    """What `data.label_unit: auto` counts a label budget in for this dataset: "case" (whole
    groups, for datasets whose groups are patients / cases) or "image" (semiseg.data.splits)."""
    intensity: Any = None
    """Set by `load_dataset`: the training-split statistics the images were normalised with
    (semiseg.data.normalize.IntensityStats), None for per-image normalisation."""
    native: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    """Image i and its mask at source resolution (PNG or slice size, a phantom's
    data.native_size), raw, padded to a square as before the resize to image_size; None where
    the stored images are the source. The SAM stage refines there (semiseg.sam.native)."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise DatasetError(f"{self.source}: the dataset has no images")
        if self.images.ndim not in (3, 4) or self.masks.shape != self.images.shape[:1] + self.images.shape[-2:]:
            raise DatasetError(
                f"{self.source}: masks {self.masks.shape} do not match images {self.images.shape}; "
                "expected images (N, H, W) or (N, C, H, W) and masks (N, H, W)"
            )
        if len(self.groups) != n or len(self.ids) != n:
            raise DatasetError(f"{self.source}: groups/ids must have one entry per image ({n})")
        if self.volumes is not None:
            self.volumes.check(n, self.source)
        if self.label_unit not in ("image", "case"):
            raise DatasetError(f"{self.source}: label_unit {self.label_unit!r}; expected image or case")
        if self.channel_names is not None and len(self.channel_names) != self.in_channels:
            raise DatasetError(f"{self.source}: {len(self.channel_names)} channel names for "
                               f"{self.in_channels} input channel(s)")
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

    @property
    def in_channels(self) -> int:
        """Input channels of every image: the model's in_channels follows the dataset."""
        return 1 if self.images.ndim == 3 else int(self.images.shape[1])


DatasetBuilder = Callable[[DataConfig], SegData]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def load_dataset(cfg: DataConfig) -> SegData:
    """Build the dataset that `cfg.name` names, normalised by `cfg.normalize`: mapped from the
    node's prepared-data cache when `cfg.cache` (semiseg.data.cache), built here otherwise."""
    # Imported here: normalize imports splits, which imports this module; so does the cache.
    from semiseg.data.cache import cached_load
    from semiseg.data.normalize import normalize_dataset

    builder = DATASETS.get(cfg.name)  # first: an unknown name fails before anything is written

    def build(c: DataConfig) -> SegData:
        return normalize_dataset(builder(c), c)

    return cached_load(cfg, build) if cfg.cache else build(cfg)


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
