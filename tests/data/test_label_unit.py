"""Labels by case (`data.label_unit: case`, `data.labeled_cases`): whole groups labeled, nested
across budgets, paired across methods, the dataset's own unit under `auto`, and the unit
recorded in the split summary."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.config import DataConfig, load_config
from semiseg.data.base import SegData
from semiseg.data.splits import label_unit, make_split
from semiseg.errors import ConfigError, DatasetError

FRACTIONS = [0.05, 0.1, 0.25, 0.5, 1.0]


def cases(sizes=(3, 7, 2, 5, 4, 6, 1, 8, 3, 5, 2, 4, 6, 3, 5, 7, 2, 4, 3, 6), unit: str = "case",
          positioned: bool = False) -> SegData:
    """Groups of uneven sizes (slices per case), so labeling whole cases is not the same as
    labeling a count of images."""
    groups = [f"case{g:02d}" for g, size in enumerate(sizes) for _ in range(size)]
    n = len(groups)
    rng = np.random.default_rng(0)
    return SegData(rng.standard_normal((n, 4, 4)).astype(np.float32),
                   rng.integers(0, 2, (n, 4, 4)).astype(np.int64), groups,
                   [f"img{i:03d}" for i in range(n)], ["background", "organ"], "cases",
                   positions=list(range(n)) if positioned else None, label_unit=unit)


def cfg(fraction: float = 0.25, **kw) -> DataConfig:
    return DataConfig(name="nnunet", label_fraction=fraction, **kw)


def groups_of(data: SegData, indices: list[int]) -> set[str]:
    return {data.groups[i] for i in indices}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_case_unit_labels_whole_cases_nested_across_fractions(seed: int) -> None:
    data = cases()
    previous: set[int] = set()
    for fraction in FRACTIONS:
        split = make_split(data, cfg(fraction), seed)
        train_groups = groups_of(data, split.labeled + split.unlabeled)
        labeled = groups_of(data, split.labeled)
        assert not labeled & groups_of(data, split.unlabeled)  # a case is labeled whole or not
        assert split.labeled == [i for i in split.labeled + split.unlabeled
                                 if data.groups[i] in labeled]
        assert len(labeled) == max(1, int(np.floor(fraction * len(train_groups) + 0.5)))
        assert previous <= set(split.labeled)  # a larger budget keeps every labeled case
        previous = set(split.labeled)
        assert split.label_unit == "case" and split.summary(data)["labeling"] == {
            "unit": "case", "labeled_groups": len(labeled), "train_groups": len(train_groups)}


def test_paired_across_methods_and_seeds_differ() -> None:
    data = cases()
    a = load_config(None, ["data.name=nnunet", "method.name=supervised", "train.seed=3"])
    b = load_config(None, ["data.name=nnunet", "method.name=mean_teacher", "train.seed=3"])
    assert make_split(data, a.data, a.train.seed) == make_split(data, b.data, b.train.seed)
    labeled = {tuple(make_split(data, cfg(0.25), seed).labeled) for seed in range(6)}
    assert len(labeled) > 1  # the seed picks the cases
    by_unit = [make_split(data, cfg(0.25, label_unit=u), 0) for u in ("case", "image")]
    assert (by_unit[0].val, by_unit[0].test) == (by_unit[1].val, by_unit[1].test)


def test_labeled_cases_counts_cases_and_matches_the_fraction_order() -> None:
    data = cases()
    train_groups = len(groups_of(data, make_split(data, cfg(), 0).labeled
                                 + make_split(data, cfg(), 0).unlabeled))
    previous: set[str] = set()
    for k in (1, 2, 3, 7):
        split = make_split(data, cfg(labeled_cases=k), 0)
        labeled = groups_of(data, split.labeled)
        assert len(labeled) == k and previous <= labeled
        previous = labeled
    # k cases are the same k as the fraction that labels k cases: one order of the cases.
    same = make_split(data, cfg(labeled_cases=3), 0).labeled
    assert same == make_split(data, cfg(3 / train_groups), 0).labeled
    with pytest.raises(DatasetError, match=f"labeled_cases=99 but only {train_groups} training"):
        make_split(data, cfg(labeled_cases=99), 0)


def test_auto_is_the_datasets_unit() -> None:
    volumes, images = cases(unit="case"), cases(unit="image")
    assert label_unit(volumes, cfg()) == "case" and label_unit(images, cfg()) == "image"
    assert label_unit(volumes, cfg(label_unit="image")) == "image"
    assert label_unit(images, cfg(labeled_cases=2)) == "case"  # it counts cases
    split = make_split(images, cfg(0.25), 0)
    assert split.label_unit == "image" and groups_of(images, split.labeled) & groups_of(images, split.unlabeled)
    assert split.summary(images)["labeling"]["unit"] == "image"


def test_case_unit_spreads_positioned_groups() -> None:
    """Slice blocks with positions: the first labeled blocks fall in both halves of training z."""
    data = cases(sizes=(4,) * 20, positioned=True)
    for seed in range(5):
        split = make_split(data, cfg(labeled_cases=2), seed)
        train = sorted(split.labeled + split.unlabeled, key=lambda i: data.positions[i])
        median = data.positions[train[len(train) // 2]]
        assert {data.positions[i] < median for i in split.labeled} == {True, False}, seed


@pytest.mark.parametrize("overrides, fragment", [
    (["data.labeled_cases=-1"], "data.labeled_cases=-1: expected 0"),
    (["data.labeled_cases=2", "data.label_unit=image"], "counts cases but data.label_unit=image"),
    (["data.label_unit=slice"], "data.label_unit='slice' is not a valid choice"),
])
def test_bad_label_budget_config(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(None, overrides)

