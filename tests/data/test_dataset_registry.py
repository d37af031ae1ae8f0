"""Every registered dataset, built from a small real instance and checked against the SegData
contract and a leakage-free split. A new dataset fails `test_every_dataset_has_a_case` until it
gets a case here, so it is tested the moment it is added."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data import DATASETS, load_dataset
from semiseg.data.splits import make_split


def _folder(root: Path) -> DataConfig:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / "images" / f"case{i}.png")
        Image.fromarray(rng.integers(0, 3, (20, 20), dtype=np.uint8)).save(root / "masks" / f"case{i}.png")
    (root / "dataset.yaml").write_text("classes: [background, liver, kidney]\n")
    return DataConfig(name="folder", root=str(root), image_size=16)


def _nifti(root: Path) -> DataConfig:
    rng = np.random.default_rng(0)
    for p in range(1, 5):
        folder = root / f"patient{p:03d}"
        folder.mkdir(parents=True)
        image = rng.normal(size=(16, 16, 3)).astype(np.float32)
        label = rng.integers(0, 4, (16, 16, 3)).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"patient{p:03d}_frame01.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"patient{p:03d}_frame01_gt.nii.gz")
    return DataConfig(name="nifti", root=str(root), image_size=16)


def _nnunet(root: Path) -> DataConfig:
    from tests.conftest import write_nnunet_dataset

    return DataConfig(name="nnunet", root=str(write_nnunet_dataset(root / "d", cases=6, channels=("CT",))), image_size=8)


CASES: dict[str, Callable[[Path], DataConfig]] = {
    "synthetic": lambda _: DataConfig(name="synthetic", image_size=32, num_images=30),
    "mni-tissue": lambda _: DataConfig(name="mni-tissue", image_size=32),
    "folder": _folder,
    "nifti": _nifti,
    "nnunet": _nnunet,
}


def test_every_dataset_has_a_case() -> None:
    assert sorted(CASES) == DATASETS.names()


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract_and_split(name: str, tmp_path: Path) -> None:
    cfg = CASES[name](tmp_path)
    data = load_dataset(cfg)
    n, h, w = data.images.shape
    assert (h, w) == (cfg.image_size, cfg.image_size)
    assert data.images.dtype == np.float32 and np.isfinite(data.images).all()
    assert data.masks.dtype == np.int64 and data.masks.shape == data.images.shape
    assert 0 <= data.masks.min() and data.masks.max() < data.num_classes
    assert data.classes[0] == "background" and len(data.ids) == len(data.groups) == n
    split = make_split(data, DataConfig(**{**cfg.__dict__, "label_fraction": 0.5}), seed=0)
    roles = [set(split.labeled) | set(split.unlabeled), set(split.val), set(split.test)]
    assert all(roles) and sum(map(len, roles)) == n
    group_sets = [{data.groups[i] for i in r} for r in roles]
    assert not (group_sets[0] & group_sets[1] or group_sets[0] & group_sets[2] or group_sets[1] & group_sets[2])
