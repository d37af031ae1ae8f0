"""The `data` config section: which dataset, at which size, split how.

It lives here, outside the `semiseg.data` package, so that the dataset modules can import it
and `semiseg.config` can too without loading any dataset code (torch, nibabel, PIL): the schema
stays light and the two never import each other. Plain dataclass, like `sam/config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    label_fraction: float = 0.05
    """Fraction of the training images whose masks a method may use, in (0, 1]."""
    val_fraction: float = 0.15
    """Fraction of groups (patients, volumes, slice blocks) held out for model selection."""
    test_fraction: float = 0.2
    """Fraction of groups held out for the final test metrics."""
    split_seed: int = 0
    """Seed of the train/val/test split, fixed across seeds so every run shares one test set."""
    batch_size: int = 8
    """Labeled images per step (the unlabeled batch has the same size)."""

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


def check_seed(key: str, seed: int) -> None:
    """Raise ConfigError naming `key` unless `seed` is in [0, 2**32)."""
    # numpy's generators refuse negative seeds, and the engine seeds torch generators with
    # seed * 1000 + rank, which must stay below 2**64: [0, 2**32) is safe for both.
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key}={seed}: expected an integer in [0, 2**32)")
