"""Leakage-free splits: roles partition the data, groups never straddle roles, val/test are fixed
across fractions and seeds, labeled subsets are nested across fractions and sized half-up."""

from __future__ import annotations

import hashlib
import json
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest

from semiseg.config import DataConfig
from semiseg.data import SegData, load_dataset
from semiseg.data.splits import Split, labeled_count, make_split
from semiseg.errors import DatasetError

FRACTIONS = [0.05, 0.25, 1.0]


@pytest.fixture(scope="module")
def synthetic() -> SegData:
    return load_dataset(DataConfig(name="synthetic", image_size=32, num_images=60))


def grouped(num_groups: int = 12, per_group: int = 4, source: str = "grouped",
            positioned: bool = False) -> SegData:
    """A hand-built dataset where every group (patient) holds several images; `positioned`
    gives each image a slice position (groups are then consecutive slice blocks)."""
    n = num_groups * per_group
    rng = np.random.default_rng(0)
    return SegData(
        images=rng.standard_normal((n, 8, 8)).astype(np.float32),
        masks=rng.integers(0, 2, (n, 8, 8)).astype(np.int64),
        groups=[f"patient{i // per_group:02d}" for i in range(n)],
        ids=[f"img{i:03d}" for i in range(n)],
        classes=["background", "organ"],
        source=source,
        positions=list(range(n)) if positioned else None,
    )


def cfg(fraction: float = 0.25, **kw) -> DataConfig:
    return DataConfig(name="synthetic", label_fraction=fraction, **kw)


def train_of(split: Split) -> set[int]:
    return set(split.labeled) | set(split.unlabeled)


def check_partition(split: Split, n: int) -> None:
    labeled, unlabeled = set(split.labeled), set(split.unlabeled)
    val, test = set(split.val), set(split.test)
    train = labeled | unlabeled
    # no duplicates inside a role
    for role in (split.labeled, split.unlabeled, split.val, split.test):
        assert len(role) == len(set(role))
    assert labeled and val and test
    assert labeled <= train
    assert unlabeled == train - labeled
    assert not labeled & unlabeled
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(n))


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("seed", [0, 3])
def test_partition_synthetic(synthetic: SegData, fraction: float, seed: int) -> None:
    check_partition(make_split(synthetic, cfg(fraction), seed), len(synthetic.images))


@pytest.mark.parametrize("positioned", [False, True])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_groups_never_cross_roles(fraction: float, positioned: bool) -> None:
    data = grouped(positioned=positioned)
    for seed in range(3):
        for split_seed in range(3):
            split = make_split(data, cfg(fraction, split_seed=split_seed), seed)
            check_partition(split, len(data.images))
            # labeled/unlabeled may share a patient (both are train); train/val/test may not
            coarse = {i: ("train" if r in ("labeled", "unlabeled") else r)
                      for i, r in split.roles().items()}
            role_of_group: dict[str, str] = {}
            for i, group in enumerate(data.groups):
                assert role_of_group.setdefault(group, coarse[i]) == coarse[i], group
            assert set(role_of_group.values()) == {"train", "val", "test"}


def test_synthetic_split_is_unchanged() -> None:
    """Datasets without positions keep the plain seeded permutations: the quickstart's split
    (240 phantoms) is pinned to what make_split gave before stratified splits existed, so its
    printed Dice cannot move. The split depends only on the group names, not on the pixels."""
    data = load_dataset(DataConfig(name="synthetic", image_size=16, num_images=240))
    assert data.positions is None
    digest = hashlib.sha256()
    for fraction in FRACTIONS:
        for seed in (0, 1, 2):
            s = make_split(data, cfg(fraction), seed)
            digest.update(json.dumps([s.labeled, s.unlabeled, s.val, s.test]).encode())
    assert digest.hexdigest() == "61fd3f2e30931a9b970ac197506c4410169f9496cdd11d40d14e2ee8492b6fd6"
    split = make_split(data, cfg(0.05), 0)
    assert split.val[:8] == [10, 15, 35, 52, 60, 70, 75, 83]
    assert split.test[:8] == [0, 5, 6, 13, 17, 25, 36, 39]
    assert split.labeled == [8, 33, 38, 45, 48, 137, 190, 194]


def test_deterministic(synthetic: SegData) -> None:
    for fraction in FRACTIONS:
        assert make_split(synthetic, cfg(fraction), 5) == make_split(synthetic, cfg(fraction), 5)
    # a freshly generated copy of the dataset splits the same way
    again = load_dataset(DataConfig(name="synthetic", image_size=32, num_images=60))
    assert make_split(again, cfg(0.25), 1) == make_split(synthetic, cfg(0.25), 1)


def test_val_test_fixed_across_fractions_and_seeds(synthetic: SegData) -> None:
    ref = make_split(synthetic, cfg(0.05), 0)
    for fraction in FRACTIONS:
        for seed in range(4):
            split = make_split(synthetic, cfg(fraction), seed)
            assert split.val == ref.val
            assert split.test == ref.test
            assert train_of(split) == train_of(ref)


def test_split_seed_moves_val_test(synthetic: SegData) -> None:
    a = make_split(synthetic, cfg(0.25, split_seed=0), 0)
    b = make_split(synthetic, cfg(0.25, split_seed=1), 0)
    assert (a.val, a.test) != (b.val, b.test)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labeled_nested_across_fractions(synthetic: SegData, seed: int) -> None:
    sets = [set(make_split(synthetic, cfg(f), seed).labeled) for f in (0.05, 0.1, 0.25, 0.5, 1.0)]
    for small, large in zip(sets, sets[1:]):
        assert small <= large
        assert len(small) < len(large)


def test_different_seeds_differ(synthetic: SegData) -> None:
    labeled = {tuple(make_split(synthetic, cfg(0.25), seed).labeled) for seed in range(4)}
    assert len(labeled) == 4


def _half_up(fraction: float, n: int) -> int:
    return max(1, int((Decimal(str(fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP)))


@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0])
def test_labeled_count_in_split(synthetic: SegData, fraction: float) -> None:
    split = make_split(synthetic, cfg(fraction), 0)
    n_train = len(train_of(split))
    assert len(split.labeled) == _half_up(fraction, n_train)
    assert len(split.unlabeled) == n_train - len(split.labeled)


def test_labeled_count_rounding() -> None:
    assert labeled_count(0.25, 10) == 3   # 2.5 rounds up, not to even
    assert labeled_count(0.25, 6) == 2    # 1.5 -> 2
    assert labeled_count(0.1, 14) == 1    # 1.4 -> 1
    assert labeled_count(0.001, 10) == 1  # never zero
    assert labeled_count(1.0, 37) == 37
    # exact halves that float multiplication lands just below (0.29 * 50 = 14.499999...)
    assert labeled_count(0.29, 50) == 15
    assert labeled_count(0.145, 100) == 15
    for k in range(1, 101):
        f = k / 100
        for n in range(1, 301):
            assert labeled_count(f, n) == _half_up(f, n), (f, n)


def test_tiny_fraction_gives_one(synthetic: SegData) -> None:
    split = make_split(synthetic, cfg(1e-6), 0)
    assert len(split.labeled) == 1


def test_full_fraction_no_unlabeled(synthetic: SegData) -> None:
    split = make_split(synthetic, cfg(1.0), 0)
    assert split.unlabeled == []
    assert set(split.labeled) == train_of(make_split(synthetic, cfg(0.05), 0))


@pytest.mark.parametrize("num_groups", [1, 2])
def test_too_few_groups(num_groups: int) -> None:
    data = grouped(num_groups=num_groups, per_group=5, source="tiny")
    with pytest.raises(DatasetError) as info:
        make_split(data, cfg(0.5), 0)
    assert "tiny" in str(info.value) and "3" in str(info.value)


def test_three_groups_is_enough() -> None:
    data = grouped(num_groups=3, per_group=2)
    split = make_split(data, cfg(0.5), 0)
    check_partition(split, len(data.images))


def test_manifest(synthetic: SegData) -> None:
    split = make_split(synthetic, cfg(0.25), 0)
    rows = split.manifest(synthetic)
    assert len(rows) == len(synthetic.images)
    assert [r["index"] for r in rows] == list(range(len(synthetic.images)))
    roles = split.roles()
    for row in rows:
        i = row["index"]
        assert row["id"] == synthetic.ids[i]
        assert row["group"] == synthetic.groups[i]
        assert row["role"] == roles[i]
    counts = {role: sum(r["role"] == role for r in rows) for role in ("labeled", "unlabeled", "val", "test")}
    assert counts == {"labeled": len(split.labeled), "unlabeled": len(split.unlabeled),
                      "val": len(split.val), "test": len(split.test)}
    # no positions: the row format readers know, unchanged
    assert all(set(row) == {"index", "id", "group", "role"} for row in rows)
    summary = split.summary(synthetic)
    assert {role: summary[role]["images"] for role in counts} == counts
    assert not any(key.startswith("position") for row in summary.values() for key in row)


def test_manifest_grouped() -> None:
    data = grouped()
    split = make_split(data, cfg(0.5), 2)
    rows = split.manifest(data)
    assert {r["id"] for r in rows} == set(data.ids)
    assert {r["role"] for r in rows} == {"labeled", "unlabeled", "val", "test"}
