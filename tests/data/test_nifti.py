"""The nifti dataset (ACDC layout): slicing, patient groups and every error naming its file."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.config import DataConfig
from semiseg.data import load_dataset
from semiseg.data.nifti import ACDC_CLASSES
from semiseg.errors import DatasetError

PATIENTS = ["patient001", "patient002", "patient003"]
FRAMES = ["01", "12"]


def _save(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _write(root: Path, shape=(32, 32, 4)) -> Path:
    """3 patients x 2 frames, plus the ACDC files the loader must skip."""
    rng = np.random.default_rng(0)
    for p in PATIENTS:
        d = root / p
        d.mkdir(parents=True)
        for f in FRAMES:
            labels = np.zeros(shape, np.uint8)
            labels[4:12, 4:12], labels[14:20, 6:16], labels[22:28, 10:20] = 1, 2, 3
            _save(d / f"{p}_frame{f}.nii.gz", rng.normal(100, 20, shape).astype(np.float32))
            _save(d / f"{p}_frame{f}_gt.nii.gz", labels)
        _save(d / f"{p}_4d.nii.gz", np.zeros((*shape, 2), np.float32))
        (d / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


def _load(root: Path):
    return load_dataset(DataConfig(name="nifti", root=str(root), image_size=32))


def _fails(root: Path, *fragments: str) -> None:
    with pytest.raises(DatasetError) as err:
        _load(root)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_slices_and_patient_groups(tmp_path):
    d = _load(_write(tmp_path))
    n = len(PATIENTS) * len(FRAMES) * 4
    assert d.images.shape == d.masks.shape == (n, 32, 32) and d.images.dtype == np.float32
    assert d.masks.dtype == np.int64 and d.classes == ACDC_CLASSES and d.source == "nifti"
    assert sorted(set(d.groups)) == PATIENTS and d.groups.count("patient002") == 8
    assert d.ids[:5] == [f"patient001_frame01_z0{z}" for z in range(4)] + ["patient001_frame12_z00"]
    assert all(i.startswith(g) for i, g in zip(d.ids, d.groups))
    # image_size equals the slice size: labels come through unchanged (x, y axes kept).
    assert d.masks[0][5, 5] == 1 and d.masks[0][16, 10] == 2 and d.masks[0][25, 15] == 3


def test_non_square_slices_and_class_map_from_yaml(tmp_path):
    root = _write(tmp_path, shape=(32, 24, 3))
    (root / "dataset.yaml").write_text("classes: [background, a, b, c]\n")
    d = _load(root)
    assert d.images.shape == (18, 32, 32) and d.classes == ["background", "a", "b", "c"]


def test_no_patients(tmp_path):
    (tmp_path / "notes").mkdir()
    _fails(tmp_path, "no patients found", str(tmp_path))


def test_root_not_a_directory(tmp_path):
    _fails(tmp_path / "absent", "absent", "not a directory")


@pytest.mark.parametrize("suffix", ["", "_gt"])
def test_truncated_volume(tmp_path, suffix):
    root = _write(tmp_path, shape=(64, 64, 8))
    path = root / "patient002" / f"patient002_frame12{suffix}.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    _fails(root, path.name, "truncated or corrupt")


def test_missing_label_volume(tmp_path):
    root = _write(tmp_path)
    (root / "patient003" / "patient003_frame01_gt.nii.gz").unlink()
    _fails(root, "patient003_frame01.nii.gz", "patient003_frame01_gt.nii.gz")


def test_shape_mismatch(tmp_path):
    root = _write(tmp_path)
    _save(root / "patient001" / "patient001_frame12_gt.nii.gz", np.zeros((32, 32, 3), np.uint8))
    _fails(root, "patient001_frame12_gt.nii.gz", "(32, 32, 3)", "(32, 32, 4)")


def test_labels_outside_class_map(tmp_path):
    root = _write(tmp_path)
    labels = np.zeros((32, 32, 4), np.uint8)
    labels[0, 0, 0] = 4
    _save(root / "patient002" / "patient002_frame01_gt.nii.gz", labels)
    _fails(root, "patient002_frame01_gt.nii.gz", "[4]", "0..3")
