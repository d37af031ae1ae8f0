"""The label-budget planner (semiseg.report_planner) on synthetic learning curves whose budgets
are known: Dice(n) = a - b * n**-0.5 per method, plus seed noise and test-image effects shared
by every trial (one test set), resampled by the same bootstrap as the paired verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semiseg import report_bands, report_planner
from semiseg.report_planner import fit_power_law, labels_needed, plan

TRAIN = 160       # training images: fraction f labels round(f * 160)
IMAGES = 30       # test images
CURVES = {"supervised": (0.85, 0.6), "semi": (0.84, 0.5), "weak": (0.70, 0.3),
          "falling": (0.70, -0.3)}  # (a, b), c = 0.5
FULL = 0.85 - 0.6 / np.sqrt(TRAIN)  # supervised at every label: what the targets are a share of


def needed(method: str, share: float) -> float:
    a, b = CURVES[method]
    return (b / (a - share * FULL)) ** 2


def synthetic(fractions: dict[str, list[float]], seeds: int = 3,
              rng_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict]]:
    """Trials, per-image metrics and split summaries of a sweep on the known curves."""
    rng = np.random.default_rng(rng_seed)
    effect = rng.normal(0, 0.05, IMAGES)
    effect -= effect.mean()  # the test set's mean is the curve itself
    trials, images, summaries = [], [], {}
    for method, swept in fractions.items():
        a, b = CURVES[method]
        for fraction in swept:
            n = round(fraction * TRAIN)
            for seed in range(seeds):
                run = f"{method}-{fraction}-{seed}"
                values = a - b / np.sqrt(n) + rng.normal(0, 0.01) + effect \
                    + rng.normal(0, 0.02, IMAGES)
                trials.append({"run_id": run, "method": method, "label_fraction": fraction,
                               "seed": seed, "params": "{}", "dice": float(values.mean())})
                images += [{"run_id": run, "id": f"img{i:02d}", "dice_mean": v}
                           for i, v in enumerate(values)]
                summaries[run] = {"labeled": {"images": n, "groups": n}, "labeling": {"unit": "image"}}
    return pd.DataFrame(trials), pd.DataFrame(images), summaries


def planned(fractions: dict[str, list[float]], **kw) -> pd.DataFrame:
    trials, per_image, summaries = synthetic(fractions, **kw)
    chosen = report_planner.labeled_counts(trials, summaries)
    return plan(chosen, report_bands.resample_all(chosen, per_image)).set_index(["method", "target"])


ALL = [0.05, 0.1, 0.25, 0.5, 1.0]  # 8, 16, 40, 80, 160 labeled images


def test_fit_recovers_a_noiseless_curve() -> None:
    counts = np.array([8, 16, 40, 80, 160.0])
    fit = fit_power_law(counts, 0.84 - 0.5 * counts ** -0.5)
    assert fit.a[0] == pytest.approx(0.84, abs=2e-3) and fit.c[0] == pytest.approx(0.5, rel=0.03)
    assert labels_needed(fit, 0.9 * FULL)[0] == pytest.approx(needed("semi", 0.9), rel=0.01)
    with pytest.raises(ValueError, match="3 distinct positive counts"):
        fit_power_law(counts[:2], [0.5, 0.6])


def test_known_budgets_are_recovered_within_their_ci() -> None:
    rows = planned({"supervised": ALL, "semi": ALL})
    for method in ("supervised", "semi"):
        for share in (0.90, 0.95):
            row, truth = rows.loc[(method, share)], needed(method, share)
            assert row["ci_low"] <= truth <= row["ci_high"], (method, share, truth, row.to_dict())
            assert row["labels"] == pytest.approx(truth, rel=0.25)
            assert row["ci_high"] < 2.5 * row["ci_low"]  # a CI that says something
            assert row["status"] == "within the swept range" and row["unit"] == "image"
            assert row["target_dice"] == pytest.approx(share * FULL, abs=0.01)
    # The semi-supervised curve reaches each target with fewer labels, as its curve says.
    assert rows.loc[("semi", 0.9), "labels"] < rows.loc[("supervised", 0.9), "labels"]


def test_a_budget_beyond_the_swept_range_is_flagged() -> None:
    """semi swept at 8, 16, 24 labeled images: 90 % needs 18 (inside), 95 % needs 42."""
    rows = planned({"supervised": ALL, "semi": [0.05, 0.1, 0.15]})
    assert rows.loc[("semi", 0.9), "status"].startswith("within the swept range")
    high = rows.loc[("semi", 0.95)]
    assert high["status"] == "extrapolated beyond the swept range" and high["labels"] > 24
    assert high["swept_max"] == 24


def test_a_ceiling_below_the_target_is_never_reached() -> None:
    rows = planned({"supervised": ALL, "weak": ALL})
    row = rows.loc[("weak", 0.9)]
    assert np.isinf(row["labels"]) and row["status"].startswith("not reached")
    assert report_planner.format_count(row["labels"], "image") == "never"


def test_too_few_budgets_or_no_full_supervision_give_reasons() -> None:
    rows = planned({"supervised": ALL, "semi": [0.1, 0.5]}, seeds=1)
    assert rows.loc[("semi", 0.9), "status"].startswith("n/a: 2 swept budget(s)")
    assert np.isnan(rows.loc[("semi", 0.9), "labels"])
    rows = planned({"supervised": ALL, "falling": ALL}, seeds=1)
    assert rows.loc[("falling", 0.9), "status"].startswith("n/a: its test Dice does not rise")
    rows = planned({"semi": ALL}, seeds=1)
    assert rows.loc[("semi", 0.95), "status"].startswith("n/a: no supervised run at label fraction 1.0")


def test_labeled_counts_follow_the_split_unit() -> None:
    trials = pd.DataFrame({"run_id": ["a", "b", "c"], "label_fraction": [0.1, 0.1, 0.5]})
    summaries = {"a": {"labeled": {"images": 40, "groups": 3}, "labeling": {"unit": "case"}},
                 "b": {"labeled": {"images": 16, "groups": 9}, "labeling": {"unit": "image"}}}
    out = report_planner.labeled_counts(trials, summaries)
    assert out["count"].tolist() == [3.0, 16.0, 0.5]
    assert out["unit"].tolist() == ["case", "image", "fraction"]
    assert report_planner.format_count(0.5, "fraction") == "50%"
    assert report_planner.format_count(17.2, "image") == "18"


def test_no_planner_figure_without_a_fitted_curve(tmp_path: Path) -> None:
    """The figure itself is drawn in tests/test_report.py::test_dashboard_has_every_section."""
    trials, per_image, summaries = synthetic({"supervised": ALL, "semi": [0.1, 0.5]}, seeds=1)
    chosen = report_planner.labeled_counts(trials, summaries)
    rows = plan(chosen, report_bands.resample_all(chosen, per_image, n_boot=100))
    assert report_planner.plot_planner(chosen, rows.assign(a=np.nan), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
