"""semiseg.paired on hand-made frames whose answers are computed by hand: no MLflow, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from semiseg import paired


def _run(method: str, seed: int, dice: float, val: float | None = None, fraction: float = 0.1,
         params: str = "{}") -> dict:
    return {"run_id": f"{method}-{fraction}-{seed}-{params}", "method": method,
            "label_fraction": fraction, "seed": seed, "params": params, "dice": dice,
            "best_val_dice": dice if val is None else val}


def _images(run_id: str, values: dict[str, float]) -> list[dict]:
    return [{"run_id": run_id, "id": image, "dice_mean": v} for image, v in values.items()]


def test_per_seed_differences_by_hand() -> None:
    method = pd.DataFrame([_run("m", s, d) for s, d in ((2, 0.80), (0, 0.70), (1, 0.65))])
    base = pd.DataFrame([_run("supervised", s, d) for s, d in ((0, 0.60), (1, 0.66), (2, 0.70), (3, 0.9))])
    diff = paired.seed_differences(method, base)
    assert diff.index.tolist() == [0, 1, 2]  # seed 3 has no partner: not paired
    assert diff.tolist() == pytest.approx([0.10, -0.01, 0.10])


@pytest.mark.parametrize("delta, expected", [(0.05, "better"), (-0.05, "worse"), (0.0, "within noise")])
def test_constant_image_differences_give_a_zero_width_ci(delta: float, expected: str) -> None:
    trials = pd.DataFrame([_run(m, s, 0.5 + (delta if m == "m" else 0.0))
                           for m in ("m", "supervised") for s in (0, 1, 2)])
    rows = []
    for _, t in trials.iterrows():
        shift = delta if t["method"] == "m" else 0.0
        rows += _images(t["run_id"], {f"img{i}": 0.1 * i + shift for i in range(4)})
    (row,) = paired.paired_comparisons(trials, pd.DataFrame(rows)).to_dict("records")
    assert row["per_seed"] == pytest.approx({0: delta, 1: delta, 2: delta})
    assert row["mean_diff"] == pytest.approx(delta)
    assert row["ci_high"] - row["ci_low"] == pytest.approx(0.0, abs=1e-12)  # float rounding only
    assert row["ci_low"] == pytest.approx(delta, abs=1e-12)
    assert row["verdict"] == expected
    assert row["resampled"] == "3 seeds × 4 test images"


def test_symmetric_seed_differences_are_within_noise() -> None:
    """Two seeds, +0.1 and -0.1, no per-image data: the seed bootstrap's mean is -0.1, 0 or +0.1
    with probabilities 1/4, 1/2, 1/4, so the 95 % CI is [-0.1, +0.1]."""
    trials = pd.DataFrame([_run("m", 0, 0.6), _run("m", 1, 0.4),
                           _run("supervised", 0, 0.5), _run("supervised", 1, 0.5)])
    (row,) = paired.paired_comparisons(trials).to_dict("records")
    assert row["per_seed"] == pytest.approx({0: 0.1, 1: -0.1})
    assert row["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((-0.1, 0.1))
    assert row["verdict"] == "within noise"
    assert row["resampled"] == "2 seeds only (no per-image test metrics)"


def test_images_are_paired_by_id_not_by_position() -> None:
    """The baseline's images come in another order and include one the method lacks; paired by
    id, every difference is +0.1 (paired by position they would not be)."""
    trials = pd.DataFrame([_run("m", 0, 0.7), _run("supervised", 0, 0.6)])
    per_image = pd.DataFrame(_images("m-0.1-0-{}", {"a": 0.9, "b": 0.5})
                             + _images("supervised-0.1-0-{}", {"c": 0.1, "b": 0.4, "a": 0.8}))
    groups = paired.image_differences(per_image, trials[trials.method == "m"],
                                      trials[trials.method == "supervised"], [0])
    assert [g.tolist() for g in groups] == [pytest.approx([0.1, 0.1])]
    (row,) = paired.paired_comparisons(trials, per_image).to_dict("records")
    assert row["ci_low"] == pytest.approx(0.1) and row["ci_high"] == pytest.approx(0.1)
    assert row["verdict"] == "better" and row["resampled"] == "1 seed × 2 test images"


def test_missing_images_of_one_seed_fall_back_to_seeds_only() -> None:
    trials = pd.DataFrame([_run(m, s, 0.5 + 0.1 * s * (m == "m")) for m in ("m", "supervised") for s in (0, 1)])
    per_image = pd.DataFrame(_images("m-0.1-0-{}", {"a": 0.5}) + _images("supervised-0.1-0-{}", {"a": 0.5}))
    (row,) = paired.paired_comparisons(trials, per_image).to_dict("records")
    assert row["resampled"] == "2 seeds only (no per-image test metrics)"
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.0, 0.1))


def test_one_seed_without_images_has_no_ci() -> None:
    trials = pd.DataFrame([_run("m", 0, 0.9), _run("supervised", 0, 0.5)])
    (row,) = paired.paired_comparisons(trials).to_dict("records")
    assert row["mean_diff"] == pytest.approx(0.4)
    assert np.isnan(row["ci_low"]) and row["verdict"] == "n/a"  # one number says nothing of noise


def test_bootstrap_variance_is_the_two_stage_variance() -> None:
    """Groups [0, 1] and [2, 3]: one drawn group's resampled mean has variance
    Var(group means) + mean(within-group variance / n) = 1.0 + 0.125; the mean of two draws
    has half of it, 0.5625, and its expectation is the grand mean 1.5."""
    stats = paired.hierarchical_bootstrap([np.array([0.0, 1.0]), np.array([2.0, 3.0])], n_boot=40_000)
    assert stats.mean() == pytest.approx(1.5, abs=0.02)
    assert stats.var() == pytest.approx(0.5625, rel=0.03)
    again = paired.hierarchical_bootstrap([np.array([0.0, 1.0]), np.array([2.0, 3.0])], n_boot=40_000)
    assert np.array_equal(stats, again)  # a fixed RNG seed: the same report every time


def test_bootstrap_rejects_empty_groups() -> None:
    with pytest.raises(ValueError, match="none of them empty"):
        paired.hierarchical_bootstrap([np.array([1.0]), np.array([])])


def test_verdict_thresholds() -> None:
    assert paired.verdict(0.001, 0.2) == "better"
    assert paired.verdict(-0.2, -0.001) == "worse"
    assert paired.verdict(-0.1, 0.1) == paired.verdict(0.0, 0.0) == "within noise"
    assert paired.verdict(np.nan, np.nan) == "n/a"


def test_configs_are_selected_on_val_not_on_test() -> None:
    """Threshold 0.9 has the best test Dice, 0.8 the best val Dice: 0.8 is the one compared."""
    thr = {t: json.dumps({"threshold": t}) for t in (0.8, 0.9)}
    trials = pd.DataFrame(
        [_run("pseudo_label", s, 0.60, val=0.80, params=thr[0.8]) for s in (0, 1)]
        + [_run("pseudo_label", s, 0.90, val=0.70, params=thr[0.9]) for s in (0, 1)]
        + [_run("supervised", s, 0.55 + 0.01 * s) for s in (0, 1)])
    chosen = paired.select_on_val(trials)
    assert set(chosen[chosen.method == "pseudo_label"]["params"]) == {thr[0.8]}
    (row,) = paired.paired_comparisons(trials).to_dict("records")
    assert row["params"] == thr[0.8] and row["mean_diff"] == pytest.approx(0.045)


def test_one_row_per_method_and_fraction_and_missing_baseline() -> None:
    trials = pd.DataFrame([_run(m, s, 0.5, fraction=f) for m in ("a", "b", "supervised")
                           for f in (0.1, 0.5) for s in (0, 1)]
                          + [_run("c", 0, 0.5, fraction=0.25)])
    table = paired.paired_comparisons(trials)
    assert list(table.columns) == paired.COLUMNS
    assert sorted(zip(table.method, table.label_fraction)) == [
        ("a", 0.1), ("a", 0.5), ("b", 0.1), ("b", 0.5), ("c", 0.25)]
    lone = table[table.method == "c"].iloc[0]
    assert lone["seeds"] == 0 and lone["verdict"] == "n/a" and pd.isna(lone["baseline_params"])
    assert lone["resampled"] == "no supervised run at this label fraction"
    assert paired.paired_comparisons(trials.iloc[:0]).empty
