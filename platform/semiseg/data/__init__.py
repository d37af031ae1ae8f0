"""Datasets (a registry), splits, augmentations and loaders. Importing this package imports
every module in it (`semiseg.registry.import_modules`), so a new dataset file is registered
(and tested) the moment it is added."""

from semiseg.data.base import DATASETS, SegData, load_dataset
from semiseg.registry import import_modules

# The package's helper modules: everything else is a dataset file.
_NOT_DATASETS = {"base", "cache", "nnunet_layout", "normalize", "resize", "sampling", "splits", "transforms"}

import_modules(__name__, __path__, skip=_NOT_DATASETS)

__all__ = ["DATASETS", "SegData", "load_dataset"]
