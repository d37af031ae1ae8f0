"""The mni-tissue dataset: real template slices from the installed nilearn package."""

import numpy as np
import pytest

from semiseg.config import DataConfig
from semiseg.data import load_dataset
from semiseg.data.mni_tissue import BLOCK, _read, load_volumes, template_path
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
