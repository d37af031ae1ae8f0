"""The `data` config section: which dataset, at which size, split how.

It lives here, outside the `semiseg.data` package, so that the dataset modules can import it
and `semiseg.config` can too without loading any dataset code (torch, nibabel, PIL): the schema
stays light and the two never import each other. Plain dataclass, like `sam/config.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from semiseg.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Dataset name; `semiseg datasets` lists the choices."""
    root: str = ""
    """Folder of a `folder` or `nifti` dataset (resolved to an absolute path)."""
    image_size: int = 64
    """Images and masks are resized to image_size x image_size pixels."""
    num_images: int = 240
    """Number of phantoms the `synthetic` dataset generates (other datasets ignore it)."""
    native_size: int = 0
    """`synthetic` only: draw each phantom at native_size x native_size (e.g. 256, 512) and
    downsample it to image_size for training, so the SAM stage refines at that resolution;
    0 draws at image_size. Other datasets' native size is their files' (PNG or slice size)."""
    label_fraction: float = 0.05
    """Fraction of the training images (label_unit image) or training cases (label_unit case)
    whose masks a method may use, in (0, 1]."""
    label_unit: Literal["auto", "image", "case"] = "auto"
    """What a label budget counts: `case` labels whole groups (patients / cases: every slice of
    a labeled case, none of the others), as peers count "3 labeled patients"; `image` labels
    single images spread over all training groups. `auto`: the dataset's own unit, `case` for
    the volume datasets nnunet and nifti, `image` for the others (split_summary.json says which
    was used)."""
    labeled_cases: int = 0
    """Label exactly this many training cases instead of a label_fraction of them (label_unit
    case; 0: use label_fraction)."""
    val_fraction: float = 0.15
    """Fraction of groups (patients, volumes, slice blocks) held out for model selection."""
    test_fraction: float = 0.2
    """Fraction of groups held out for the final test metrics."""
    split_seed: int = 0
    """Seed of the train/val/test split, fixed across seeds so every run shares one test set."""
    batch_size: int = 8
    """Labeled images per step (the unlabeled batch has the same size)."""
    normalize: Literal["image", "dataset", "ct"] = "image"
    """Intensity normalisation (semiseg.data.normalize, after nnU-Net's schemes): `image`
    z-scores each image on its own; `dataset` z-scores with the mean and std of all training
    pixels; `ct` clips to the 0.5-99.5 percentiles of the training foreground (mask > 0)
    intensities, then z-scores with their mean and std (nnU-Net's CTNormalization). The
    statistics come from the training split only (labeled + unlabeled), never val or test."""
    cache: bool = True
    """Keep the prepared (resized, normalised) dataset in a memory-mapped cache that every
    worker and actor of a node maps (semiseg.data.cache); false builds it in each process."""
    cache_dir: str = ""
    """Folder of that cache; "" is $SEMISEG_CACHE/data (default ~/.cache/semiseg/data).
    `semiseg datasets --prepare CONFIG` fills it ahead of a sweep."""

    def identity(self) -> dict[str, Any]:
        """The section as it enters a run's identity (Config.identity): every field, except
        those added later while they hold the default that behaves as before them, so a config
        written before a field existed keeps its hash and a rerun still skips finished trials."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY
                and (k not in IDENTITY_DEFAULTS or v != IDENTITY_DEFAULTS[k])}

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(
                f"data.label_fraction={self.label_fraction}: expected a value in (0, 1]"
            )
        for key in ("image_size", "num_images", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"data.{key}={getattr(self, key)}: expected a positive integer")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 0.5:
                raise ConfigError(f"data.{key}={getattr(self, key)}: expected a value in (0, 0.5)")
        check_seed("data.split_seed", self.split_seed)
        if self.native_size and self.native_size < self.image_size:
            raise ConfigError(f"data.native_size={self.native_size}: expected 0 (draw at "
                              f"image_size) or at least data.image_size={self.image_size}")
        if self.labeled_cases < 0:
            raise ConfigError(f"data.labeled_cases={self.labeled_cases}: expected 0 (use "
                              "data.label_fraction) or a positive number of cases")
        if self.labeled_cases and self.label_unit == "image":
            raise ConfigError(f"data.labeled_cases={self.labeled_cases} counts cases but "
                              "data.label_unit=image; set data.label_unit=case (or auto)")


def check_seed(key: str, seed: int) -> None:
    """Raise ConfigError naming `key` unless `seed` is in [0, 2**32)."""
    # numpy's generators refuse negative seeds, and the engine seeds torch generators with
    # seed * 1000 + rank, which must stay below 2**64: [0, 2**32) is safe for both.
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key}={seed}: expected an integer in [0, 2**32)")


# Fields added after runs were logged -> the default that reproduces the earlier behaviour.
IDENTITY_DEFAULTS: dict[str, Any] = {"native_size": 0, "normalize": "image"}
# Fields that change where the prepared data is kept, never what is trained on.
NOT_IDENTITY = frozenset({"cache", "cache_dir"})
