"""Stratified splits for datasets with positions (slice blocks along z): val and test groups are
evenly spaced over the volume, every labeled prefix is spread over the training positions, the
labeled subsets stay nested across fractions and paired across methods, and the manifest and
summary show each role's position range. tests/data/test_mni_tissue.py checks the real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semiseg.data import SegData
from semiseg.data.splits import labeled_count, make_split, spread_order
from semiseg.data_config import DataConfig
from semiseg.errors import DatasetError


def slice_blocks(num_blocks: int = 20, per_block: int = 4, positioned: bool = True) -> SegData:
    """A volume of num_blocks * per_block slices in blocks of consecutive slices. Images are
    stored in a shuffled order and block names do not sort by position, so a split that
    follows positions cannot be following indices or names by accident."""
    n = num_blocks * per_block
    z = np.random.default_rng(1).permutation(n)
    names = [f"b{(7 * b) % num_blocks:02d}" for b in range(num_blocks)]  # 7 is coprime to 20
    rng = np.random.default_rng(0)
    return SegData(
        images=rng.standard_normal((n, 4, 4)).astype(np.float32),
        masks=rng.integers(0, 2, (n, 4, 4)).astype(np.int64),
        groups=[names[int(zi) // per_block] for zi in z],
        ids=[f"slice_z{int(zi):03d}" for zi in z],
        classes=["background", "organ"],
        source="blocks",
        positions=[int(zi) for zi in z] if positioned else None,
    )


def cfg(fraction: float = 0.25, **kw) -> DataConfig:
    return DataConfig(name="synthetic", label_fraction=fraction, **kw)


def block_ranks(data: SegData, indices: list[int]) -> list[int]:
    """The ranks (0 = lowest z) of the blocks these images belong to."""
    per_block = len(data.ids) // len(set(data.groups))
    return sorted({int(data.positions[i]) // per_block for i in indices})


def coverage(data: SegData, indices: list[int], pool: list[int]) -> float:
    """The share of the pool's position range that the indices' positions span."""
    z, zp = np.asarray(data.positions)[indices], np.asarray(data.positions)[pool]
    return float((z.max() - z.min()) / (zp.max() - zp.min()))


@pytest.mark.parametrize("split_seed", range(8))
def test_test_and_val_blocks_are_evenly_spaced(split_seed: int) -> None:
    data = slice_blocks()
    split = make_split(data, cfg(split_seed=split_seed), 0)
    num_blocks = len(set(data.groups))
    n_test, n_val = round(0.2 * num_blocks), round(0.15 * num_blocks)
    test = block_ranks(data, split.test)
    assert len(test) == n_test
    # one test block in each of n_test equal-width strata of the blocks sorted by z
    assert [r * n_test // num_blocks for r in test] == list(range(n_test))
    # and the val blocks likewise among the blocks left
    rest = [r for r in range(num_blocks) if r not in test]
    val = [rest.index(r) for r in block_ranks(data, split.val)]
    assert [v * n_val // len(rest) for v in val] == list(range(n_val))


def test_split_seed_moves_the_stratified_blocks() -> None:
    data = slice_blocks()
    held = {tuple(block_ranks(data, make_split(data, cfg(split_seed=s), 0).test)) for s in range(8)}
    assert len(held) > 1


def test_held_out_blocks_without_positions_can_cluster() -> None:
    """The plain permutation (kept for datasets without positions) is what fails the spacing
    above: for some split seed its test blocks leave a stratum empty."""
    plain, positioned = slice_blocks(positioned=False), slice_blocks()
    for split_seed in range(20):
        split = make_split(plain, cfg(split_seed=split_seed), 0)
        ranks = block_ranks(positioned, split.test)  # same images, same z
        if sorted({r * 4 // 20 for r in ranks}) != list(range(4)):
            return
    pytest.fail("20 random draws of 4 of 20 blocks all had one per stratum")


def spread_bound(n: int, k: int) -> float:
    """Once k >= 2^m, each of the 2^m nested strata (about n/2^m ranks each) holds a pick, so
    no run of unpicked ranks is longer than two strata: < 4n/k, plus rounding."""
    return 4 * n / k + 2


@pytest.mark.parametrize("n", [1, 2, 3, 10, 67, 200])
def test_spread_order_is_a_permutation_spread_at_every_prefix(n: int) -> None:
    for seed in range(5):
        order = spread_order(n, np.random.default_rng(seed))
        assert sorted(order) == list(range(n))
        for k in range(1, n + 1):
            assert max_gap(order[:k], n) <= spread_bound(n, k), (seed, k)
        if n >= 2:  # the first two picks lie in different halves (an odd middle goes either way)
            assert min(order[:2]) < (n + 1) // 2 and max(order[:2]) >= n // 2, seed


def max_gap(ranks: list[int], n: int) -> int:
    """The largest run of ranks 0..n-1 holding no pick, ends included."""
    edges = [-1, *sorted(ranks), n]
    return max(b - a - 1 for a, b in zip(edges, edges[1:]))


def test_a_plain_permutation_fails_the_spread_bound() -> None:
    """The bound above is tight enough to reject what the unstratified draw does."""
    n = 200
    failures = 0
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(n).tolist()
        failures += any(max_gap(order[:k], n) > spread_bound(n, k) for k in range(1, n + 1))
    assert failures == 5


def test_spread_order_is_seeded() -> None:
    assert spread_order(50, np.random.default_rng(3)) == spread_order(50, np.random.default_rng(3))
    assert spread_order(50, np.random.default_rng(3)) != spread_order(50, np.random.default_rng(4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labeled_nested_across_fractions(seed: int) -> None:
    data = slice_blocks()
    sets = [make_split(data, cfg(f), seed).labeled for f in (0.05, 0.1, 0.25, 0.5, 1.0)]
    for small, large in zip(sets, sets[1:]):
        assert set(small) < set(large)
    train = make_split(data, cfg(1.0), seed)
    assert len(sets[0]) == labeled_count(0.05, len(train.labeled)) and not train.unlabeled


def test_labeled_depends_only_on_fraction_and_seed() -> None:
    """Paired across methods: nothing but the fraction, the seed and the split config enters."""
    data = slice_blocks()
    a = make_split(data, cfg(0.1), 1)
    b = make_split(data, DataConfig(name="mni-tissue", label_fraction=0.1, batch_size=3,
                                    image_size=16, num_images=7), 1)
    assert a == b
    assert len({tuple(make_split(data, cfg(0.1), seed).labeled) for seed in range(4)}) == 4


def test_labeled_subset_spreads_over_the_training_positions() -> None:
    data = slice_blocks(num_blocks=30)
    for seed in range(10):
        split = make_split(data, cfg(0.05), seed)  # 4 labeled slices of ~80
        train = split.labeled + split.unlabeled
        assert len(split.labeled) == 4
        assert coverage(data, split.labeled, train) >= 0.5, seed
        # one labeled slice in each half of the training slices, by z
        median = np.median(np.asarray(data.positions)[train])
        assert {data.positions[i] < median for i in split.labeled} == {True, False}, seed


def test_manifest_and_summary_show_positions() -> None:
    data = slice_blocks()
    split = make_split(data, cfg(0.25), 0)
    rows = split.manifest(data)
    assert all(set(row) == {"index", "id", "group", "role", "position"} for row in rows)
    assert all(row["position"] == int(row["id"].removeprefix("slice_z")) for row in rows)
    summary = split.summary(data)
    for role in ("labeled", "unlabeled", "val", "test", "train"):
        members = split.labeled + split.unlabeled if role == "train" else getattr(split, role)
        z = [data.positions[i] for i in members]
        assert summary[role]["images"] == len(members)
        assert summary[role]["groups"] == len({data.groups[i] for i in members})
        assert (summary[role]["position_min"], summary[role]["position_max"]) == (min(z), max(z))
        assert summary[role]["position_mean"] == pytest.approx(np.mean(z), abs=1e-3)
    json.dumps(rows), json.dumps(summary)  # logged as JSON artifacts


@pytest.mark.parametrize("positions, expected", [
    ([0.0, 1.0], "positions has 2 entries; expected one per image"),
    (["a", "b", "c"], "expected one number per image"),
    ([0.0, float("nan"), 2.0], "position of image i1 is not finite"),
])
def test_bad_positions_are_refused(positions: list, expected: str) -> None:
    with pytest.raises(DatasetError, match=expected) as info:
        SegData(np.zeros((3, 2, 2), np.float32), np.zeros((3, 2, 2), np.int64), ["a", "b", "c"],
                ["i0", "i1", "i2"], ["background", "x"], "slices", positions=positions)
    assert "slices" in str(info.value)
