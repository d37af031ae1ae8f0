"""The mni-tissue dataset: real template slices from the installed nilearn package."""

import numpy as np
import pytest

from semiseg.config import DataConfig
from semiseg.data import load_dataset
from semiseg.data.mni_tissue import BLOCK, _read, load_volumes, template_path
from semiseg.data.splits import make_split
from semiseg.errors import DatasetError


@pytest.fixture(scope="module")
def mni():
    return load_dataset(DataConfig(name="mni-tissue", image_size=32))


def test_loads_three_classes(mni):
    assert mni.classes == ["background", "grey_matter", "white_matter"]
    n = len(mni.ids)
    assert n > 50 and mni.images.shape == mni.masks.shape == (n, 32, 32)
    assert mni.images.dtype == np.float32 and mni.masks.dtype == np.int64
    assert set(np.unique(mni.masks)) == {0, 1, 2}
    assert all((m > 0).mean() > 0.05 for m in mni.masks)  # every slice shows some brain


def test_groups_are_blocks_of_consecutive_slices(mni):
    zs = [int(i.removeprefix("mni_z")) for i in mni.ids]
    assert zs == sorted(zs) and len(set(zs)) == len(zs)
    for group in set(mni.groups):
        members = [z for z, g in zip(zs, mni.groups) if g == group]
        assert len(members) <= BLOCK
        assert members == list(range(members[0], members[0] + len(members)))
        assert group == f"block{members[0] // BLOCK:02d}"


def test_deterministic_and_cached(mni):
    again = load_dataset(DataConfig(name="mni-tissue", image_size=32))
    assert np.array_equal(again.images, mni.images) and np.array_equal(again.masks, mni.masks)
    assert load_volumes() is load_volumes()
    assert template_path("t1").is_file()


def test_missing_template_names_the_path():
    with pytest.raises(DatasetError, match="mni_icbm152_nope_tal_nlin_sym_09a_converted.nii.gz"):
        _read("nope")


def test_positions_are_slice_indices(mni):
    assert mni.positions == [int(i.removeprefix("mni_z")) for i in mni.ids]


def _z_span(mni, indices) -> int:
    z = np.asarray(mni.positions)[indices]
    return int(z.max() - z.min())


@pytest.mark.parametrize("split_seed", range(5))
def test_val_and_test_span_the_volume(mni, split_seed):
    """A plain draw of blocks gave split seed 0 a test set in z029-055 (a quarter of the volume)
    with 4 % white matter against 12 % in train; stratified, each role spans the volume and
    test's white-matter share is close to train's."""
    split = make_split(mni, DataConfig(name="mni-tissue", split_seed=split_seed), 0)
    volume = _z_span(mni, list(range(len(mni.ids))))
    assert _z_span(mni, split.test) >= 0.6 * volume
    assert _z_span(mni, split.val) >= 0.5 * volume
    white = (mni.masks == 2).mean(axis=(1, 2))
    train = split.labeled + split.unlabeled
    assert abs(white[split.test].mean() - white[train].mean()) < 0.04


@pytest.mark.parametrize("split_seed", range(3))
def test_labeled_slices_spread_over_training_z(mni, split_seed):
    """Unstratified, every labeled slice of seeds 0-2 at 5 % lay in z088-127 (20 % of the
    training z-range at seed 0)."""
    for seed in range(3):
        split = make_split(mni, DataConfig(name="mni-tissue", label_fraction=0.05,
                                           split_seed=split_seed), seed)
        train = split.labeled + split.unlabeled
        assert _z_span(mni, split.labeled) >= 0.5 * _z_span(mni, train), seed


def test_summary_shows_each_roles_z_range(mni):
    split = make_split(mni, DataConfig(name="mni-tissue"), 0)
    summary = split.summary(mni)
    for role in ("labeled", "unlabeled", "val", "test"):
        z = [mni.positions[i] for i in getattr(split, role)]
        assert (summary[role]["position_min"], summary[role]["position_max"]) == (min(z), max(z))
    assert {row["position"] for row in split.manifest(mni)} == set(mni.positions)
