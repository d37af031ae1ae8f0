"""Real MRI without a download: axial slices of the ICBM152 2009a T1 template shipped in nilearn.

Images are axial slices (last axis) of the MNI ICBM152 nonlinear symmetric 2009a T1 template.
Labels are DERIVED, not expert annotations: per voxel, label = argmax over
(1 - gm - wm, gm, wm) of the template's grey / white matter probability maps. Only slices whose
gm+wm probability mass covers at least MIN_BRAIN_FRACTION of the slice are kept.

Neighbouring slices are nearly identical, so slices are grouped in blocks of BLOCK consecutive
slices and a split never puts neighbours on both sides.

Each slice's position is its index z, so splits are stratified along the volume
(`semiseg.data.splits`): the blocks, sorted by z, are cut into n_test strata of equal width and
the block at one seeded offset in each is test (systematic sampling), then the same over the
blocks left gives the n_val val blocks; the labeled slices of a seed are the first round(f*N)
of a seeded order that spreads every prefix over the training z-range (at least one labeled
slice in each half of the training slices from 2 on, in each quarter from 4 on). A plain random
draw of blocks put each role in its own band (split seed 0: test z029-055 with 4 % white matter
against 12 % in train; every labeled slice of seeds 0-2 at 5 % in z088-127).
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

import nibabel as nib
import numpy as np

from semiseg.data_config import DataConfig
from semiseg.data.base import DATASETS, SegData
from semiseg.data.resize import pad_square, resize_pair
from semiseg.errors import DatasetError

CLASSES = ["background", "grey_matter", "white_matter"]
BLOCK = 8
MIN_BRAIN_FRACTION = 0.15
_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def template_path(kind: str) -> Path:
    """Path of the nilearn-shipped template file of `kind` ("t1", "gm" or "wm")."""
    data = importlib.resources.files("nilearn") / "datasets" / "data"
    return Path(str(data / _FILE.format(kind)))


def _read(kind: str) -> np.ndarray:
    path = template_path(kind)
    if not path.is_file():
        raise DatasetError(f"mni-tissue: template file not found: {path} (is nilearn installed?)")
    try:
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel / gzip raise many types on a damaged file
        raise DatasetError(f"mni-tissue: cannot read {path}: {exc}") from None


@functools.lru_cache(maxsize=1)
def load_volumes() -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(t1, labels, kept slice indices); cached per process since every trial reads them.

    Callers must not modify the returned arrays (they are shared)."""
    t1, gm, wm = (_read(k) for k in ("t1", "gm", "wm"))
    # The maps are stored as 0..255; rescale to probabilities.
    gm, wm = gm / max(float(gm.max()), 1e-8), wm / max(float(wm.max()), 1e-8)
    labels = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.int64)
    brain = (gm + wm).mean(axis=(0, 1))
    return t1, labels, tuple(int(z) for z in np.flatnonzero(brain >= MIN_BRAIN_FRACTION))


@DATASETS.register("mni-tissue")
def build(cfg: DataConfig) -> SegData:
    """Axial slices with enough brain, resized to cfg.image_size; groups are slice blocks and
    positions the slice indices z."""
    t1, labels, slices = load_volumes()
    images, masks, ids, groups, positions = [], [], [], [], []
    for z in slices:
        image, mask = resize_pair(*native_slice(z), cfg.image_size)
        images.append(image)  # raw: load_dataset normalises (data.normalize)
        masks.append(mask)
        ids.append(f"mni_z{z:03d}")
        groups.append(f"block{z // BLOCK:02d}")
        positions.append(z)
    return SegData(
        images=np.stack(images),
        masks=np.stack(masks),
        groups=groups,
        ids=ids,
        classes=list(CLASSES),
        source="mni-tissue",
        positions=positions,
        native=functools.partial(_native, tuple(slices)),
    )


def native_slice(z: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial slice z and its labels at the template's own in-plane size, padded to a square."""
    t1, labels, _ = load_volumes()
    # rot90: show the slice with anterior up, as viewers do.
    return np.rot90(pad_square(t1[..., z], 0.0)), np.rot90(pad_square(labels[..., z], 0))


def _native(slices: tuple[int, ...], index: int) -> tuple[np.ndarray, np.ndarray]:
    return native_slice(slices[index])  # SegData.native: image index -> its slice
