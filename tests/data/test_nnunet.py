"""The nnunet dataset on real NIfTI files in the nnU-Net v2 and Decathlon layouts: channels,
slicing across the coarsest axis, spacing, case groups, and every bad input naming its file
with the dataset folder left unchanged (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from semiseg.config import Config, DataConfig, ModelConfig, TrainConfig
from semiseg.data import load_dataset
from semiseg.data.base import SegData, SliceOrigin, normalise
from semiseg.engine import build_trainer
from semiseg.data.splits import make_split
from semiseg.errors import DatasetError, SemisegError


def _load(root: Path, size: int = 8) -> SegData:
    return load_dataset(DataConfig(name="nnunet", root=str(root), image_size=size))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fails(root: Path, *fragments: str) -> None:
    """Loading raises a DatasetError naming every fragment, and writes nothing."""
    before = _snapshot(root)
    with pytest.raises(DatasetError) as err:
        _load(root)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert _snapshot(root) == before


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def test_v2_channels_slices_and_case_groups(tmp_path, nnunet_dataset) -> None:
    root = nnunet_dataset(tmp_path / "d")
    d = _load(root)
    assert d.images.shape == (20, 2, 8, 8) and d.masks.shape == (20, 8, 8) and d.in_channels == 2
    assert d.channel_names == ["T2", "ADC"] and d.classes == ["background", "box", "bar"]
    assert d.groups[:4] == ["case00"] * 4 and sorted(set(d.groups)) == [f"case0{i}" for i in range(5)]
    assert d.ids[:2] == ["case00_z000", "case00_z001"] and d.label_unit == "case"
    # case00 is 8 x 8 at 1 mm in-plane, so at image_size 8 its slices are the files' voxels,
    # each channel z-scored on its own.
    for c, name in enumerate(d.channel_names):
        raw = np.asarray(nib.load(root / "imagesTr" / f"case00_{c:04d}.nii.gz").dataobj)
        np.testing.assert_allclose(d.images[2, c], normalise(raw[..., 2]), atol=1e-5)
    label = np.asarray(nib.load(root / "labelsTr" / "case00.nii.gz").dataobj)
    assert np.array_equal(d.masks[:4], np.moveaxis(label, -1, 0))
    assert d.volumes.volume[5] == "case01" and d.volumes.z[5] == 1
    assert d.volumes.spacing["case00"] == (1.0, 1.0, 1.0)
    assert d.volumes.spacing["case01"] == pytest.approx((0.8, 0.8, 2.5))  # 8 px over 6.4 mm


def test_msd_layout_reads_the_same_cases(tmp_path, nnunet_dataset) -> None:
    """Everything a sweep's trial reads from the loader is identical for the Decathlon copy, so
    only the v2 layout runs through a sweep (tests/integration/test_ray_job.py's job, whose
    cases=6 and image_size=16 are used here)."""
    v2 = _load(nnunet_dataset(tmp_path / "v2", cases=6), 16)
    msd = _load(nnunet_dataset(tmp_path / "msd", "msd", cases=6), 16)  # 4D files and "._" forks
    assert np.array_equal(v2.images, msd.images) and np.array_equal(v2.masks, msd.masks)
    assert (v2.ids, v2.groups, v2.classes, v2.channel_names) == \
        (msd.ids, msd.groups, msd.classes, msd.channel_names)
    # the sweep's checks: 2 input channels, case label budget, per-case 3D Dice's slice origins
    assert msd.in_channels == v2.in_channels == 2 and msd.num_classes == v2.num_classes == 3
    assert msd.label_unit == v2.label_unit == "case"
    assert msd.volumes is not None and msd.volumes == v2.volumes
    assert sorted(set(msd.volumes.volume)) == [f"case{i:02d}" for i in range(6)]


def test_slices_across_the_coarsest_axis_in_square_mm_pixels(tmp_path, nnunet_dataset) -> None:
    # 8 x 8 x 4 voxels of 3 x 1 x 0.5 mm: axis 0 is the coarsest, so 8 slices of 8 x 4 voxels,
    # 8 mm x 2 mm; at 16 px the pixel is 0.5 mm: 16 rows x 4 columns, padded left and right.
    root = nnunet_dataset(tmp_path / "d", cases=3, channels=("CT",), spacings=((3.0, 1.0, 0.5),))
    d = _load(root, 16)
    assert d.images.shape == (24, 16, 16) and d.in_channels == 1  # one channel: (N, H, W)
    assert d.volumes.spacing["case00"] == (0.5, 0.5, 3.0) and d.volumes.z[:3] == [0, 1, 2]
    label = np.asarray(nib.load(root / "labelsTr" / "case00.nii.gz").dataobj)
    expected = np.repeat(label[3], 2, axis=0)  # rows doubled; the 4 columns already 0.5 mm
    assert np.array_equal(d.masks[3][:, 6:10], expected)
    assert not d.masks[3][:, :6].any() and not d.masks[3][:, 10:].any()


def test_model_in_channels_follow_the_dataset(tmp_path, nnunet_dataset) -> None:
    data = _load(nnunet_dataset(tmp_path / "d"))
    cfg = Config(data=DataConfig(name="nnunet", root=str(tmp_path / "d"), image_size=8, batch_size=2),
                 model=ModelConfig(base_channels=4, depth=2), train=TrainConfig(epochs=1, steps_per_epoch=1))
    trainer = build_trainer(cfg, data, make_split(data, cfg.data, 0), torch.device("cpu"))
    assert trainer.model.in_channels == 2 and trainer.tensors.val.images.shape[1:] == (2, 8, 8)
    assert np.isfinite(trainer.run_epoch(0)["train/loss"])


def test_sam_pseudolabels_refuse_multichannel_data(tmp_path, nnunet_dataset) -> None:
    from semiseg.distributed.pseudolabel import run_pseudolabel  # imports ray: only this test

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    cfg = Config(data=DataConfig(name="nnunet", root=str(nnunet_dataset(tmp_path / "d")), image_size=8))
    with pytest.raises(SemisegError, match="2 input channels .T2, ADC.*single-channel"):
        run_pseudolabel(cfg, str(tmp_path / "checkpoint.pt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_slice_origin_is_checked() -> None:
    images, masks = np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.int64)
    with pytest.raises(DatasetError, match="same .volume, z."):
        SegData(images, masks, ["a", "a"], ["a0", "a1"], ["background"], "t",
                volumes=SliceOrigin(["a", "a"], [0, 0], {"a": (1.0, 1.0, 1.0)}))
    with pytest.raises(DatasetError, match="no voxel spacing for volume b"):
        SegData(images, masks, ["a", "b"], ["a0", "b0"], ["background"], "t",
                volumes=SliceOrigin(["a", "b"], [0, 0], {"a": (1.0, 1.0, 1.0)}))


# ---- bad input: each names the file, and the dataset folder is left as it was --------------

def _edit_json(root: Path, **changes) -> None:
    spec = json.loads((root / "dataset.json").read_text())
    spec.update(changes)
    (root / "dataset.json").write_text(json.dumps(spec))


def test_missing_channel_file(tmp_path, nnunet_dataset) -> None:
    root = nnunet_dataset(tmp_path / "d")
    (root / "imagesTr" / "case02_0001.nii.gz").unlink()
    _fails(root, str(root / "imagesTr" / "case02_0001.nii.gz"), "missing channel 1 of case 'case02'",
           "case02_0000..case02_0001.nii.gz")


def test_label_not_in_dataset_json(tmp_path, nnunet_dataset) -> None:
    root = nnunet_dataset(tmp_path / "d")
    label = np.asarray(nib.load(root / "labelsTr" / "case01.nii.gz").dataobj).copy()
    label[0, 0, 0] = 7
    _save(root / "labelsTr" / "case01.nii.gz", label, np.diag([0.8, 0.8, 2.5, 1]))
    _fails(root, str(root / "labelsTr" / "case01.nii.gz"), "label values [7] are not in the labels",
           str(root / "dataset.json"), "0 background, 1 box, 2 bar")


@pytest.mark.parametrize("what", ["label shape", "label affine", "channel shape", "channel affine"])
def test_image_and_label_on_different_grids(tmp_path, nnunet_dataset, what: str) -> None:
    root = nnunet_dataset(tmp_path / "d")
    kind, field = what.split()
    path = root / ("labelsTr/case03.nii.gz" if kind == "label" else "imagesTr/case03_0001.nii.gz")
    data = np.asarray(nib.load(path).dataobj)
    affine = np.diag([0.8, 0.8, 2.5, 1])
    if field == "shape":
        data = data[:, :, :3]
    else:
        affine[0, 3] = 5.0  # shifted by 5 mm
    _save(path, data, affine)
    _fails(root, str(path), f"{kind} {field}", str(root / "imagesTr" / "case03_0000.nii.gz"),
           "one voxel grid")


@pytest.mark.parametrize("text, fragment", [
    ('{"channel_names": {"0": "T2"},', "not valid JSON: Expecting property name"),
    ("[1, 2]", "expected a JSON object"),
])
def test_dataset_json_that_is_not_valid(tmp_path, nnunet_dataset, text: str, fragment: str) -> None:
    root = nnunet_dataset(tmp_path / "d")
    (root / "dataset.json").write_text(text)
    _fails(root, str(root / "dataset.json"), fragment)


@pytest.mark.parametrize("changes, fragments", [
    ({"labels": {"background": 0, "tumour": [1, 2]}}, ["region-based labels are not supported"]),
    ({"labels": {"background": 0, "box": 1, "bar": 3}}, ["label values [0, 1, 3]", "consecutive"]),
    ({"file_ending": ".png"}, ["file_ending '.png'", "NIfTI only"]),
    ({"numTraining": 9}, ["numTraining is 9 but 5 training case(s)"]),
    ({"channel_names": {"0": "T2"}}, ["case00_0001.nii.gz", "channel 1, but", "declares 1 channel"]),
])
def test_v2_dataset_json_mistakes(tmp_path, nnunet_dataset, changes, fragments) -> None:
    root = nnunet_dataset(tmp_path / "d")
    _edit_json(root, **changes)
    _fails(root, *fragments)


def test_image_without_label_and_no_dataset_json(tmp_path, nnunet_dataset) -> None:
    root = nnunet_dataset(tmp_path / "d")
    (root / "labelsTr" / "case04.nii.gz").unlink()
    _fails(root, str(root / "imagesTr" / "case04_0000.nii.gz"), "has no label",
           str(root / "labelsTr" / "case04.nii.gz"))
    (root / "dataset.json").unlink()
    _fails(root, str(root), "no dataset.json")


def test_msd_mistakes(tmp_path, nnunet_dataset) -> None:
    root = nnunet_dataset(tmp_path / "d", "msd")
    _edit_json(root, modality={"0": "T2", "1": "ADC", "2": "DWI"})
    _fails(root, str(root / "imagesTr" / "case00.nii.gz"), "(X, Y, Z, 3) for the 3 modalities")
    _edit_json(root, modality={"0": "T2", "1": "ADC"})
    (root / "imagesTr" / "case01.nii.gz").unlink()
    _fails(root, str(root / "imagesTr" / "case01.nii.gz"), "image file not found", "training[1]")
