"""Paired statistics: each method against supervised-only at the same label fraction, on the
same splits and seeds, with a bootstrap 95 % CI and a verdict (better / within noise / worse).

A trial's split is fixed by (label_fraction, seed), so a method's run and the baseline's run
with the same fraction and seed saw the same labeled images and are scored on the same test
images. The difference is therefore paired twice: per seed, and per test image within a seed.

The CI is a two-stage (hierarchical) percentile bootstrap of the mean difference: resample the
seeds with replacement, then, inside each drawn seed, resample its test images with
replacement, using the same image ids for both methods (their per-image differences are
resampled, never the two methods separately). Both sources of noise are in it: which split and
initialisation a seed gives, and which test images happen to be in the test set. Without
per-image test metrics (runs logged before `test_per_image.json` existed) the images cannot be
resampled and the CI is over seeds only; the table says which (one seed without images gives
no CI and no verdict). A bootstrap cannot show more spread than its units do: over two seeds
only, the CI is about their range, which is why the row says what it resampled. A fixed RNG
seed makes every report of the same runs print the same CI.

Pure pandas/numpy: the caller reads the runs (report.finished_trials) and the per-image
metrics (tracking.per_image_metrics), so everything here is tested on hand-made frames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BASELINE = "supervised"      # semiseg.methods.FULL_SUPERVISION_METHOD, without importing torch
VAL_KEY = "best_val_dice"    # val Dice of the epoch each trial selected: the selection key
IMAGE_KEY = "dice_mean"      # per-image key of test_per_image.json (mean over its classes)
N_BOOT = 2000
RNG_SEED = 0
BETTER, WORSE, NOISE, UNKNOWN = "better", "worse", "within noise", "n/a"
COLUMNS = ["method", "label_fraction", "params", "baseline_params", "seeds", "per_seed",
           "mean_diff", "ci_low", "ci_high", "resampled", "verdict"]


def select_on_val(trials: pd.DataFrame) -> pd.DataFrame:
    """Only the trials of each (method, label_fraction)'s method.params with the highest val
    Dice (VAL_KEY) averaged over seeds; never chosen on test. Ties, and settings without a
    val metric, go to the first params in sorted order, so the choice is deterministic."""
    if trials.empty:
        return trials
    scores = (trials.assign(_val=val_scores(trials))
              .groupby(["method", "label_fraction", "params"])["_val"].mean().reset_index())
    scores = scores.sort_values(["method", "label_fraction", "_val", "params"],
                                ascending=[True, True, False, True], na_position="last")
    chosen = scores.drop_duplicates(["method", "label_fraction"])[["method", "label_fraction", "params"]]
    return trials.merge(chosen, on=["method", "label_fraction", "params"]).reset_index(drop=True)


def val_scores(trials: pd.DataFrame) -> pd.Series:
    """Each trial's VAL_KEY as floats; NaN for runs that did not log it."""
    if VAL_KEY not in trials:
        return pd.Series(np.nan, index=trials.index)
    return pd.to_numeric(trials[VAL_KEY], errors="coerce").astype(float)


def seed_differences(method: pd.DataFrame, baseline: pd.DataFrame, value: str = "dice") -> pd.Series:
    """Per seed present in both: method minus baseline of `value` (runs repeated with the same
    config and seed are averaged first), indexed by seed in ascending order."""
    diff = method.groupby("seed")[value].mean() - baseline.groupby("seed")[value].mean()
    return diff.dropna().sort_index()


def image_differences(per_image: pd.DataFrame, method: pd.DataFrame, baseline: pd.DataFrame,
                      seeds: list[int], key: str = IMAGE_KEY) -> list[np.ndarray] | None:
    """Per seed, method minus baseline of `key` on each test image both were scored on (joined
    by image id; images undefined for either are dropped). None unless every seed has at
    least one such image: then the bootstrap falls back to seeds only for the whole row."""
    if per_image is None or per_image.empty or key not in per_image:
        return None
    groups = []
    for seed in seeds:
        sides = [_image_values(per_image, runs[runs["seed"] == seed]["run_id"], key)
                 for runs in (method, baseline)]
        joined = pd.concat(sides, axis=1, join="inner").dropna()
        if joined.empty:
            return None
        groups.append((joined.iloc[:, 0] - joined.iloc[:, 1]).to_numpy(float))
    return groups


def _image_values(per_image: pd.DataFrame, run_ids: pd.Series, key: str) -> pd.Series:
    rows = per_image[per_image["run_id"].isin(list(run_ids))]
    return rows.groupby("id")[key].mean()


def hierarchical_bootstrap(groups: list[np.ndarray], n_boot: int = N_BOOT,
                           seed: int = RNG_SEED) -> np.ndarray:
    """n_boot resampled means: draw len(groups) groups (seeds) with replacement; for each drawn
    group draw its values (images) with replacement and take their mean; average over the
    drawn groups. Each draw of a group resamples its images afresh, also when a seed is drawn
    twice. A group of one value is a seed without images: then it is a bootstrap over seeds."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("hierarchical_bootstrap needs at least one group, none of them empty")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    means = np.empty(drawn.shape)
    for index, values in enumerate(groups):
        where = drawn == index
        picks = rng.integers(0, len(values), size=(int(where.sum()), len(values)))
        means[where] = values[picks].mean(axis=1)
    return means.mean(axis=1)


def verdict(ci_low: float, ci_high: float) -> str:
    """better if the whole CI is above 0, worse if below, within noise if it contains 0."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return UNKNOWN
    if ci_low > 0:
        return BETTER
    if ci_high < 0:
        return WORSE
    return NOISE


def compare(method: pd.DataFrame, baseline: pd.DataFrame, per_image: pd.DataFrame | None = None,
            n_boot: int = N_BOOT, seed: int = RNG_SEED) -> dict:
    """One method's trials against the baseline's at one label fraction: per-seed differences
    of test Dice, their mean, the bootstrap 95 % CI, what was resampled, and the verdict."""
    per_seed = seed_differences(method, baseline)
    seeds = [int(s) for s in per_seed.index]
    row = {"seeds": len(seeds), "per_seed": {s: float(d) for s, d in per_seed.items()},
           "mean_diff": float(per_seed.mean()) if seeds else np.nan,
           "ci_low": np.nan, "ci_high": np.nan}
    if not seeds:
        return {**row, "resampled": "no seed run by both", "verdict": UNKNOWN}
    groups = image_differences(per_image, method, baseline, seeds)
    if groups is not None:
        images = sorted({len(g) for g in groups})
        count = str(images[0]) if len(images) == 1 else f"{images[0]}-{images[-1]}"
        resampled = f"{len(seeds)} seed{'s' * (len(seeds) > 1)} × {count} test images"
    elif len(seeds) > 1:
        groups = [np.array([d]) for d in per_seed.to_numpy(float)]
        resampled = f"{len(seeds)} seeds only (no per-image test metrics)"
    else:
        return {**row, "resampled": "1 seed, no per-image test metrics: no CI", "verdict": UNKNOWN}
    low, high = np.percentile(hierarchical_bootstrap(groups, n_boot, seed), [2.5, 97.5])
    return {**row, "ci_low": float(low), "ci_high": float(high), "resampled": resampled,
            "verdict": verdict(low, high)}


def paired_comparisons(trials: pd.DataFrame, per_image: pd.DataFrame | None = None,
                       baseline: str = BASELINE, n_boot: int = N_BOOT,
                       seed: int = RNG_SEED) -> pd.DataFrame:
    """One row per (method, label fraction) other than the baseline, each method and the
    baseline at their val-selected method.params (select_on_val): COLUMNS."""
    chosen = select_on_val(trials)
    rows = []
    for (method, fraction), group in chosen.groupby(["method", "label_fraction"]):
        if method == baseline:
            continue
        base = chosen[(chosen["method"] == baseline) & np.isclose(chosen["label_fraction"], fraction)]
        row = compare(group, base, per_image, n_boot, seed)
        if base.empty:
            row["resampled"] = f"no {baseline} run at this label fraction"
        rows.append({"method": method, "label_fraction": float(fraction),
                     "params": group["params"].iloc[0],
                     "baseline_params": base["params"].iloc[0] if len(base) else None, **row})
    return pd.DataFrame(rows, columns=COLUMNS)
