"""The bad-input matrix of docs/RELIABILITY.md: one test per row.

Each test writes real files (PNG through PIL, NIfTI through nibabel, YAML as text), breaks
them the way users do, and runs the real loaders. It checks that the error is semiseg's own
(a SemisegError subclass, so the CLI prints one line instead of a traceback), that the
message names the file / key / value and what was expected, and what is kept: loaders only
read, so the input folder is byte-for-byte unchanged and nothing new appears in it.
"""

from __future__ import annotations

import contextlib
import gzip
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.config import DataConfig, load_config
from semiseg.data import SegData, load_dataset
from semiseg.data.splits import make_split
from semiseg.engine import CHECKPOINT_FILE, build_trainer, fit
from semiseg.errors import ConfigError, DatasetError, SemisegError
from semiseg.preflight import check_paths

CLASSES_YAML = "classes: [background, liver, kidney]\n"


# ---- writers: small, valid datasets on disk --------------------------------------------------


def png_dataset(root: Path, stems: tuple[str, ...] = ("p1", "p2", "p3"), size: int = 12) -> Path:
    """A valid folder dataset: 8-bit images, masks holding classes 0, 1 and 2."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem in stems:
        mask = np.zeros((size, size), np.uint8)
        mask[1:4, 1:4], mask[6:9, 6:9] = 1, 2
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
            root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text(CLASSES_YAML)
    return root


def save_nifti(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def nifti_dataset(root: Path, shape: tuple[int, int, int] = (12, 12, 2)) -> Path:
    """A valid nifti dataset: 3 patients, one frame each, labels 0..3 (the ACDC classes)."""
    rng = np.random.default_rng(0)
    for p in ("patient001", "patient002", "patient003"):
        (root / p).mkdir(parents=True)
        labels = np.zeros(shape, np.uint8)
        labels[1:3, 1:3], labels[4:6, 4:6], labels[7:9, 7:9] = 1, 2, 3
        save_nifti(root / p / f"{p}_frame01.nii.gz", rng.normal(100, 20, shape).astype(np.float32))
        save_nifti(root / p / f"{p}_frame01_gt.nii.gz", labels)
    return root


def load(root: Path, name: str = "folder") -> SegData:
    return load_dataset(DataConfig(name=name, root=str(root), image_size=16))


# ---- checks ----------------------------------------------------------------------------------


@contextlib.contextmanager
def untouched(root: Path) -> Iterator[None]:
    """What is kept: every file under root, byte for byte, and no new file."""
    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    before = snapshot()
    yield
    assert snapshot() == before


def fails(error: type[SemisegError], call, *fragments: str) -> str:
    """`call()` raises `error` (semiseg's own) whose message holds every fragment."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def dataset_fails(root: Path, *fragments: str, name: str = "folder") -> str:
    with untouched(root):
        return fails(DatasetError, lambda: load(root, name), *fragments)


def config_fails(tmp_path: Path, text: str, *fragments: str) -> str:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    with untouched(tmp_path):
        return fails(ConfigError, lambda: load_config(path), str(path), *fragments)


# ---- images and masks ------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_corrupt_png(tmp_path: Path, folder: str) -> None:
    root = png_dataset(tmp_path)
    bad = root / folder / "p2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 4)
    dataset_fails(root, str(bad), "cannot read the PNG", "corrupt")


def test_truncated_png(tmp_path: Path) -> None:
    root = png_dataset(tmp_path, size=64)
    bad = root / "images" / "p1.png"
    bad.write_bytes(bad.read_bytes()[:200])
    dataset_fails(root, str(bad), "cannot read the PNG")


def gunzip(path: Path) -> Path:
    """x.nii.gz -> x.nii, the uncompressed form."""
    out = path.with_name(path.name[: -len(".gz")])
    out.write_bytes(gzip.decompress(path.read_bytes()))
    path.unlink()
    return out


@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_nifti(tmp_path: Path, compressed: bool) -> None:
    root = nifti_dataset(tmp_path)
    bad = root / "patient002" / "patient002_frame01.nii.gz"
    if not compressed:
        bad = gunzip(bad)
        gunzip(root / "patient002" / "patient002_frame01_gt.nii.gz")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    # An uncompressed file is caught by its size before any read; a gzip one by the read.
    seen = "cannot read the NIfTI volume" if compressed else "the header declares a (12, 12, 2)"
    dataset_fails(root, str(bad), seen, "truncated", name="nifti")


def test_nifti_nan_voxels(tmp_path: Path) -> None:
    root = nifti_dataset(tmp_path)
    bad = root / "patient001" / "patient001_frame01.nii.gz"
    volume = np.ones((12, 12, 2), np.float32)
    volume[0, 0, 0], volume[1, 1, 1] = np.nan, np.inf
    save_nifti(bad, volume)
    dataset_fails(root, str(bad), "2 voxel(s) are NaN or infinite", "expected finite",
                  name="nifti")


def test_nifti_empty_volume(tmp_path: Path) -> None:
    root = nifti_dataset(tmp_path)
    bad = root / "patient003" / "patient003_frame01.nii.gz"
    save_nifti(bad, np.zeros((12, 12, 0), np.float32))
    # nibabel reads a zero-length axis back as shape (0,)
    dataset_fails(root, str(bad), "volume has shape (0,)", "expected a non-empty 3D volume",
                  name="nifti")


def test_mask_wrong_size(tmp_path: Path) -> None:
    root = png_dataset(tmp_path)
    bad = root / "masks" / "p3.png"
    Image.fromarray(np.zeros((10, 8), np.uint8)).save(bad)
    dataset_fails(root, str(bad), "mask is 8x10 (WxH)", str(root / "images" / "p3.png"), "12x12")


def test_nifti_labels_wrong_shape(tmp_path: Path) -> None:
    root = nifti_dataset(tmp_path)
    bad = root / "patient001" / "patient001_frame01_gt.nii.gz"
    save_nifti(bad, np.zeros((12, 12, 3), np.uint8))
    dataset_fails(root, str(bad), "(12, 12, 3)", "differs from image", "(12, 12, 2)",
                  name="nifti")


@pytest.mark.parametrize("mode", ["RGB", "LA"])
def test_mask_wrong_dtype_png(tmp_path: Path, mode: str) -> None:
    """A colour or grey+alpha mask: its values are not class indices."""
    root = png_dataset(tmp_path)
    bad = root / "masks" / "p1.png"
    Image.new(mode, (12, 12)).save(bad)
    dataset_fails(root, str(bad), f"mode {mode}", "expected a single-channel integer PNG")


def test_mask_wrong_dtype_nifti(tmp_path: Path) -> None:
    """Float labels that are not whole numbers (an interpolated or probability map)."""
    root = nifti_dataset(tmp_path)
    bad = root / "patient002" / "patient002_frame01_gt.nii.gz"
    save_nifti(bad, np.full((12, 12, 2), 0.5, np.float32))
    dataset_fails(root, str(bad), "non-integer values", "expected class indices", name="nifti")


def test_labels_outside_class_map(tmp_path: Path) -> None:
    """The classic: masks saved as 0/255 instead of class indices."""
    root = png_dataset(tmp_path)
    bad = root / "masks" / "p2.png"
    mask = np.zeros((12, 12), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(bad)
    dataset_fails(root, str(bad), "[255]", "outside the class map", "0..2",
                  "background, liver, kidney")


def test_nifti_labels_outside_class_map(tmp_path: Path) -> None:
    root = nifti_dataset(tmp_path)
    bad = root / "patient003" / "patient003_frame01_gt.nii.gz"
    save_nifti(bad, np.full((12, 12, 2), 7, np.uint8))
    dataset_fails(root, str(bad), "[7]", "outside the class map", "0..3", name="nifti")


def test_class_absent_from_some_masks_is_accepted(tmp_path: Path) -> None:
    """A slice without a kidney is normal: the dataset loads, the class map is unchanged."""
    root = png_dataset(tmp_path)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "masks" / "p1.png")
    mask = np.zeros((12, 12), np.uint8)
    mask[1:4, 1:4] = 1
    Image.fromarray(mask).save(root / "masks" / "p2.png")
    data = load(root)
    assert data.classes == ["background", "liver", "kidney"]
    assert [set(np.unique(m)) for m in data.masks] == [{0}, {0, 1}, {0, 1, 2}]


def test_class_absent_from_every_mask(tmp_path: Path) -> None:
    root = png_dataset(tmp_path)
    (root / "dataset.yaml").write_text("classes: [background, liver, kidney, spleen]\n")
    dataset_fails(root, str(root), "'spleen' (value 3)", "appears in no mask of the 3 images",
                  str(root / "dataset.yaml"))


# ---- dataset layout --------------------------------------------------------------------------


def test_one_image_dataset(tmp_path: Path) -> None:
    """Loads (it is a valid dataset), but cannot be split without leakage."""
    root = png_dataset(tmp_path, stems=("only",))
    cfg = DataConfig(name="folder", root=str(root), image_size=16)
    with untouched(root):
        data = load_dataset(cfg)
        fails(DatasetError, lambda: make_split(data, cfg, seed=0), str(root),
              "1 image(s) in 1 group(s)", "at least 3 groups")


def test_no_training_images_left(tmp_path: Path) -> None:
    root = png_dataset(tmp_path, stems=("a", "b", "c", "d"))
    cfg = DataConfig(name="folder", root=str(root), image_size=16, val_fraction=0.45,
                     test_fraction=0.45)
    data = load_dataset(cfg)
    fails(DatasetError, lambda: make_split(data, cfg, seed=0), str(root),
          "no training images are left", "data.val_fraction")


def test_duplicate_file_stems(tmp_path: Path) -> None:
    root = png_dataset(tmp_path)
    (root / "images" / "p1.PNG").write_bytes((root / "images" / "p1.png").read_bytes())
    dataset_fails(root, str(root / "images"), "duplicate stem 'p1'", "p1.PNG, p1.png",
                  "expected one file per stem")


def test_duplicate_nifti_frames(tmp_path: Path) -> None:
    """frame01.nii beside frame01.nii.gz: the same frame twice, which would be trained twice."""
    root = nifti_dataset(tmp_path)
    good = root / "patient001" / "patient001_frame01.nii.gz"
    copy = good.with_name("patient001_frame01.nii")
    copy.write_bytes(gzip.decompress(good.read_bytes()))
    dataset_fails(root, str(root / "patient001"), "patient001_frame01.nii and",
                  "patient001_frame01.nii.gz are the same frame", name="nifti")


def test_invalid_dataset_yaml(tmp_path: Path) -> None:
    root = png_dataset(tmp_path)
    (root / "dataset.yaml").write_text("classes: [background, liver\n")
    dataset_fails(root, str(root / "dataset.yaml"), "not valid YAML")


# ---- experiment configs ----------------------------------------------------------------------


def test_invalid_yaml_config(tmp_path: Path) -> None:
    config_fails(tmp_path, "train:\n  epochs: 3\n   lr: 0.1\n", "not valid YAML", "line 3")


def test_binary_config_file(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    fails(ConfigError, lambda: load_config(path), str(path), "not a UTF-8 text file")


@pytest.mark.parametrize("text, fragments", [
    ("train:\n  epochs: ten\n", ["train.epochs='ten'", "expected int"]),
    ("train:\n  amp: 1\n", ["train.amp=1", "expected bool"]),
    ("data:\n  image_size: 32.5\n", ["data.image_size=32.5", "expected int"]),
    ("sweep:\n  seeds: 3\n", ["sweep.seeds=3", "expected a list"]),
    ("train: [1, 2]\n", ["train: expected a mapping"]),
    ("train:\n  optimizer: adam\n", ["train.optimizer='adam'", "adamw, sgd"]),
])
def test_wrong_types_in_config(tmp_path: Path, text: str, fragments: list[str]) -> None:
    config_fails(tmp_path, text, *fragments)


@pytest.mark.parametrize("value", ["0", "-4"])
def test_batch_size_not_positive(tmp_path: Path, value: str) -> None:
    config_fails(tmp_path, f"data:\n  batch_size: {value}\n",
                 f"data.batch_size={value}", "expected a positive integer")


@pytest.mark.parametrize("text, fragments", [
    ("train:\n  lr: .nan\n", ["train.lr=nan", "expected a finite number"]),
    ("train:\n  lr: 1e999\n", ["train.lr=inf", "expected a finite number"]),
    ("train:\n  seed: -1\n", ["train.seed=-1", "[0, 2**32)"]),
    ("train:\n  weight_decay: -0.1\n", ["train.weight_decay=-0.1", "expected 0 or more"]),
])
def test_out_of_range_numbers_in_config(tmp_path: Path, text: str, fragments: list[str]) -> None:
    config_fails(tmp_path, text, *fragments)


@pytest.mark.parametrize("text, key", [
    ("data:\n  label_fraction: 0\n", "data.label_fraction=0"),
    ("sweep:\n  label_fractions: [0.0, 0.5]\n", "sweep.label_fractions has 0.0"),
])
def test_label_fraction_zero(tmp_path: Path, text: str, key: str) -> None:
    config_fails(tmp_path, text, key, "(0, 1]")


def test_tiny_label_fraction_keeps_one_labeled_image(tmp_path: Path) -> None:
    """A fraction too small for one image is rounded up to one, never to an empty set."""
    root = png_dataset(tmp_path, stems=tuple(f"case{i}" for i in range(12)))
    cfg = DataConfig(name="folder", root=str(root), image_size=16, label_fraction=1e-6)
    split = make_split(load_dataset(cfg), cfg, seed=0)
    assert len(split.labeled) == 1 and len(split.unlabeled) >= 1


# ---- checkpoints (the U-Net engine's resume path) --------------------------------------------

TINY = ["data.image_size=16", "data.num_images=12", "data.batch_size=2", "model.base_channels=2",
        "model.depth=1", "train.epochs=1", "train.steps_per_epoch=1", "train.device=cpu"]


def _bare_state_dict(path: Path) -> None:
    """A checkpoint of some other network: a plain state_dict, no semiseg metadata."""
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), path)


@pytest.mark.parametrize("other", ["wider_unet", "bare_state_dict"])
def test_checkpoint_from_different_model(tmp_path: Path, other: str) -> None:
    cfg = load_config(None, TINY)
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    ckpt = tmp_path / "ckpt"
    if other == "wider_unet":
        fit(build_trainer(load_config(None, [*TINY, "model.base_channels=4"]), data, split,
                          torch.device("cpu")), ckpt)
    else:
        ckpt.mkdir()
        _bare_state_dict(ckpt / CHECKPOINT_FILE)
    with untouched(ckpt):
        fails(SemisegError, lambda: fit(build_trainer(cfg, data, split, torch.device("cpu")),
                                        tmp_path / "run", resume_from=ckpt),
              str(ckpt / CHECKPOINT_FILE), "different config")
    assert not (tmp_path / "run").exists()  # no epoch ran, so no checkpoint was written


@pytest.mark.parametrize("content", ["garbage", "tensor"])
def test_corrupt_engine_checkpoint(tmp_path: Path, content: str) -> None:
    cfg = load_config(None, TINY)
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if content == "garbage":
        (ckpt / CHECKPOINT_FILE).write_bytes(b"\x80\x02 not a torch file")
    else:
        torch.save(torch.zeros(3), ckpt / CHECKPOINT_FILE)
    expected = "cannot read checkpoint" if content == "garbage" else "not a semiseg training state"
    with untouched(ckpt):
        fails(SemisegError, lambda: fit(build_trainer(cfg, data, split, torch.device("cpu")),
                                        tmp_path / "run", resume_from=ckpt),
              str(ckpt / CHECKPOINT_FILE), expected)


@pytest.mark.parametrize("dataset", ["folder", "nifti"])
def test_data_root_that_is_not_a_folder(tmp_path: Path, dataset: str) -> None:
    missing = tmp_path / "no_such_data"
    # the driver's check (semiseg check / train / sweep / pseudolabel), before any trial
    fails(ConfigError, lambda: check_paths(load_config(None, [f"data.name={dataset}", f"data.root={missing}"])),
          f"data.root={missing}: no such folder", dataset)
    assert not missing.exists()
