"""Leakage and comparability, end to end on real files and the real engine (CPU, no Ray).

tests/data/test_splits.py checks make_split on in-memory data and tests/test_no_hidden_mask_leak.py
checks what methods can reach; this file checks the pipeline around them:

(a) test images never reach training or model selection: roles are disjoint by image id and by
    patient on datasets loaded from disk, the engine's labeled/unlabeled/val tensors hold no
    test index, and replacing every test image and mask with noise changes nothing about
    training or which epoch is selected (only the test metrics);
(b) the labeled set is round-half-up(f * N_train), at least 1, the same for every method at a
    seed (paired comparisons) and nested across fractions, also inside the engine;
(c) the same config and seed give the same split and the same first-epoch loss, from two
    independent loads of the dataset, written to disk in different orders.
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.config import Config, DataConfig, load_config
from semiseg.data import SegData, load_dataset
from semiseg.data.splits import Split, labeled_count, make_split
from semiseg.engine import FitResult, build_trainer, fit
from semiseg.methods import METHODS

CPU = torch.device("cpu")
TINY = ["data.image_size=16", "data.batch_size=2", "data.label_fraction=0.25",
        "model.base_channels=2", "model.depth=2", "train.epochs=2", "train.steps_per_epoch=2",
        "train.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_folder(root: Path, patients: int = 8, per_patient: int = 3, reverse: bool = False) -> Path:
    """PNG dataset with several images per patient (group_pattern); `reverse` writes the
    files in the opposite order, so directory listing order differs between two copies."""
    stems = [f"pat{p:02d}_img{i}" for p in range(patients) for i in range(per_patient)]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in reversed(stems) if reverse else stems:
        seed = stems.index(stem)  # content depends on the stem only, not the write order
        rng = np.random.default_rng(seed)
        mask = np.zeros((16, 16), np.uint8)
        mask[2 + seed % 5:9, 3:10] = 1
        image = (mask * 120 + rng.integers(0, 100, (16, 16))).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text("classes: [background, organ]\ngroup_pattern: '^(pat\\d+)_'\n")
    return root


def write_nifti(root: Path, patients: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for p in range(1, patients + 1):
        folder = root / f"patient{p:03d}"
        folder.mkdir(parents=True)
        for frame in ("01", "09"):
            labels = rng.integers(0, 4, (10, 10, 3)).astype(np.uint8)
            volume = rng.normal(size=(10, 10, 3)).astype(np.float32)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"patient{p:03d}_frame{frame}.nii.gz")
            nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / f"patient{p:03d}_frame{frame}_gt.nii.gz")
    return root


def folder_config(root: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, "data.name=folder", f"data.root={root}", *overrides])


def inputs_for(name: str, data: SegData, split: Split, stage_inputs) -> list[str]:
    """Overrides setting what a multi-stage method's last stage reads from earlier stages, as
    stand-ins for the split's unlabeled images (tests/conftest.py); none for most methods."""
    inputs = stage_inputs(name, split.unlabeled, data.masks.shape[1:], data.num_classes,
                          base_channels=2, depth=2)  # TINY's model
    return [f"method.params.{key}={value}" for key, value in inputs.items()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, SegData, Split]:
    cfg = folder_config(write_folder(tmp_path_factory.mktemp("folder")))
    data = load_dataset(cfg.data)
    return cfg, data, make_split(data, cfg.data, cfg.train.seed)


def roles_by(split: Split, keys: list[str]) -> dict[str, set[str]]:
    """train / val / test as sets of image ids or groups (labeled and unlabeled are train)."""
    return {"train": {keys[i] for i in split.labeled + split.unlabeled},
            "val": {keys[i] for i in split.val}, "test": {keys[i] for i in split.test}}


# ---- (a) test images never reach training or model selection ---------------------------------


@pytest.mark.parametrize("kind", ["folder", "nifti"])
def test_roles_disjoint_by_id_and_patient(kind: str, tmp_path: Path) -> None:
    root = write_folder(tmp_path) if kind == "folder" else write_nifti(tmp_path)
    data = load_dataset(DataConfig(name=kind, root=str(root), image_size=16))
    assert len(set(data.groups)) < len(data.ids)  # several images per patient, or this is moot
    for split_seed in range(4):
        for seed, fraction in [(0, 0.1), (1, 0.5), (2, 1.0)]:
            cfg = DataConfig(name=kind, root=str(root), split_seed=split_seed,
                             label_fraction=fraction)
            split = make_split(data, cfg, seed)
            for keys in (data.ids, data.groups):
                roles = roles_by(split, keys)
                assert not roles["train"] & roles["test"], (split_seed, seed)
                assert not roles["val"] & roles["test"], (split_seed, seed)
                assert not roles["train"] & roles["val"], (split_seed, seed)


def test_engine_tensors_hold_no_test_index(folder, stage_inputs) -> None:
    """What the engine trains on (labeled, unlabeled) and selects on (val) excludes test."""
    cfg, data, split = folder
    for name in METHODS.names():
        trainer = build_trainer(folder_config(Path(cfg.data.root), f"method.name={name}",
                                              *inputs_for(name, data, split, stage_inputs)),
                                data, split, CPU)
        t = trainer.tensors
        test = set(split.test)
        assert set(t.test.index.tolist()) == test
        for part, expected in ((t.labeled, split.labeled), (t.unlabeled, split.unlabeled),
                               (t.val, split.val)):
            assert part.index.tolist() == expected and not set(expected) & test, name
            # and the pixels are those images' pixels, not a copy of some test image
            assert torch.equal(part.images[:, 0], torch.from_numpy(data.images[expected]))


def with_test_replaced(data: SegData, split: Split, indices: list[int]) -> SegData:
    """The same dataset with the images and masks at `indices` replaced by noise."""
    rng = np.random.default_rng(123)
    images, masks = data.images.copy(), data.masks.copy()
    images[indices] = rng.standard_normal(images[indices].shape).astype(np.float32)
    masks[indices] = rng.integers(0, data.num_classes, masks[indices].shape)
    return dataclasses.replace(data, images=images, masks=masks)


class Epochs:
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir) -> None:
        self.metrics.append(metrics)

    def on_fit_end(self, result: FitResult) -> None:
        pass


def run(cfg: Config, data: SegData, split: Split, workdir: Path) -> tuple[list[dict], FitResult]:
    rec = Epochs()
    result = fit(build_trainer(cfg, data, split, CPU), workdir, callbacks=[rec])
    return rec.metrics, result


def test_test_set_cannot_influence_training_or_selection(folder, tmp_path: Path) -> None:
    """Noise in place of every test image and mask: every training and validation number and
    the selected epoch stay bit-identical; only the test metrics move."""
    cfg, data, split = folder
    cfg = folder_config(Path(cfg.data.root), "method.name=mean_teacher")
    base, base_result = run(cfg, data, split, tmp_path / "a")
    noisy, noisy_result = run(cfg, with_test_replaced(data, split, split.test), split, tmp_path / "b")
    for before, after in zip(base, noisy, strict=True):
        assert before == after  # train/*, val/*, pseudo-label scores, lr, epoch
    assert noisy_result.best_epoch == base_result.best_epoch
    assert noisy_result.best_val_dice == base_result.best_val_dice
    assert noisy_result.test_metrics != base_result.test_metrics
    # The comparison is sensitive: the same noise in the val images does move val metrics.
    moved, _ = run(cfg, with_test_replaced(data, split, split.val), split, tmp_path / "c")
    assert moved[0]["val/dice_mean"] != base[0]["val/dice_mean"]


# ---- (b) label fraction: count, pairing across methods, nesting ------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_labeled_count_is_round_half_up(folder, fraction: float) -> None:
    cfg, data, _ = folder
    n_train = None
    for seed in range(3):
        split = make_split(data, dataclasses.replace(cfg.data, label_fraction=fraction), seed)
        n = len(split.labeled) + len(split.unlabeled)
        assert n_train in (None, n)  # the train pool does not depend on the seed
        n_train = n
        exact = (Decimal(str(fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP)
        assert len(split.labeled) == labeled_count(fraction, n) == max(1, int(exact))


def test_same_labeled_set_for_every_method(folder, stage_inputs) -> None:
    """Paired comparison: at one (fraction, seed), every method's engine trains on the same
    labeled images."""
    cfg, data, _ = folder
    for seed in (0, 1):
        labeled_sets = set()
        seed_split = make_split(data, cfg.data, seed)  # for the stand-in stage inputs
        for name in METHODS.names():
            mcfg = folder_config(Path(cfg.data.root), f"method.name={name}", f"train.seed={seed}",
                                 *inputs_for(name, data, seed_split, stage_inputs))
            split = make_split(data, mcfg.data, mcfg.train.seed)
            labeled_sets.add(tuple(build_trainer(mcfg, data, split, CPU).tensors.labeled.index.tolist()))
        assert len(labeled_sets) == 1, seed


def test_labeled_sets_nested_across_fractions(folder) -> None:
    cfg, data, _ = folder
    fractions = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    for seed in range(3):
        sets = [set(make_split(data, dataclasses.replace(cfg.data, label_fraction=f), seed).labeled)
                for f in fractions]
        for small, large in zip(sets, sets[1:]):
            assert small <= large, seed


# ---- (c) same config + seed -> same split, same first-epoch loss ------------------------------


def pipeline(root: Path, workdir: Path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """Everything from the config on: load the dataset from disk, split, one epoch."""
    cfg = folder_config(root, "train.epochs=1", *overrides)
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    metrics, _ = run(cfg, data, split, workdir)
    return split.manifest(data), metrics


def test_same_config_and_seed_reproduce_split_and_loss(tmp_path: Path) -> None:
    a = write_folder(tmp_path / "a")
    b = write_folder(tmp_path / "b", reverse=True)  # same files, written in reverse order
    method = "method.name=mean_teacher"  # uses labeled and unlabeled batches and augmentations
    manifest_a, metrics_a = pipeline(a, tmp_path / "run_a", method)
    manifest_b, metrics_b = pipeline(b, tmp_path / "run_b", method)
    assert manifest_a == manifest_b
    assert metrics_a[0]["train/loss"] == metrics_b[0]["train/loss"]  # exactly, not approx
    assert metrics_a == metrics_b
    # and the seed matters, so the equality above is not vacuous
    manifest_c, metrics_c = pipeline(a, tmp_path / "run_c", method, "train.seed=1")
    assert manifest_c != manifest_a
    assert metrics_c[0]["train/loss"] != metrics_a[0]["train/loss"]
