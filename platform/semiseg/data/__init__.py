"""Datasets (a registry), splits, augmentations and loaders."""

from semiseg.data.base import DATASETS, SegData, load_dataset
from semiseg.data import folder, mni_tissue, nifti, synthetic  # noqa: F401  (registers them)

__all__ = ["DATASETS", "SegData", "load_dataset"]
