"""Leakage-free splits: val and test by group (patient / volume / slice block), then a labeled
subset of the training images.

- val and test depend only on (dataset, split_seed), so every method, fraction and seed is
  scored on the same test set;
- the labeled subset depends on (label_fraction, seed): it is the first round(f*N) images of a
  seeded permutation of the training images, so subsets are nested across fractions and paired
  across methods;
- unlabeled = train - labeled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semiseg.config import DataConfig
from semiseg.data.base import SegData
from semiseg.errors import DatasetError


@dataclass(frozen=True)
class Split:
    labeled: list[int]
    unlabeled: list[int]
    val: list[int]
    test: list[int]

    def roles(self) -> dict[int, str]:
        return {i: role for role in ("labeled", "unlabeled", "val", "test") for i in getattr(self, role)}

    def manifest(self, data: SegData) -> list[dict[str, str | int]]:
        """One row per image: its index, id, group and role; logged with every run."""
        roles = self.roles()
        return [
            {"index": i, "id": data.ids[i], "group": data.groups[i], "role": roles[i]}
            for i in sorted(roles)
        ]


def labeled_count(label_fraction: float, num_train: int) -> int:
    """round(f * N), half up, and at least one image."""
    return max(1, int(np.floor(round(label_fraction * num_train, 9) + 0.5)))  # 0.29*50 -> 14.5


def make_split(data: SegData, cfg: DataConfig, seed: int) -> Split:
    groups = sorted(set(data.groups))
    where = f"{data.source} dataset" + (f" at {cfg.root}" if cfg.root else "")
    if len(groups) < 3:
        raise DatasetError(
            f"{where}: {len(data.ids)} image(s) in {len(groups)} group(s) (patients/volumes); "
            "at least 3 groups are needed to split into train, val and test without leakage"
        )
    order = np.random.default_rng(cfg.split_seed).permutation(len(groups))
    n_test = max(1, round(cfg.test_fraction * len(groups)))
    n_val = max(1, round(cfg.val_fraction * len(groups)))
    test_groups = {groups[i] for i in order[:n_test]}
    val_groups = {groups[i] for i in order[n_test : n_test + n_val]}
    role_of_group = lambda g: "test" if g in test_groups else "val" if g in val_groups else "train"  # noqa: E731
    by_role: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for index, group in enumerate(data.groups):
        by_role[role_of_group(group)].append(index)
    train = by_role["train"]
    if not train:
        raise DatasetError(
            f"{where}: no training images are left after val ({len(val_groups)} group(s)) and "
            f"test ({len(test_groups)}) of {len(groups)} groups; lower data.val_fraction / "
            "data.test_fraction or add images"
        )
    shuffled = np.random.default_rng([seed, 7919]).permutation(train).tolist()
    k = labeled_count(cfg.label_fraction, len(train))
    return Split(
        labeled=sorted(shuffled[:k]),
        unlabeled=sorted(shuffled[k:]),
        val=by_role["val"],
        test=by_role["test"],
    )
