"""Uncertainty of each method's test Dice at each label fraction: bootstrap 95 % bands for the
label-efficiency curves, the Dice table with those CIs and the paired verdict against
supervised-only, and the resampled means that the label-budget planner refits
(semiseg.report_planner).

The resampling is paired.hierarchical_bootstrap, the one the paired verdicts use: the seeds of
a (method, label fraction) with replacement, then the test images of each drawn seed with
replacement (Efron & Tibshirani 1993, ch. 13 percentile intervals; the two stages as in
Davison & Hinkley 1997, §3.8). Its draws depend only on how many seeds and images there are and
on its RNG seed, so settings that share seeds and test images (every setting of one sweep: the
test set is fixed by data.split_seed) are resampled with the same draws: one bootstrap world
across fractions and methods, as the data were generated. The planner relies on that.

Deviations:
- A trial's test Dice (test/dice_mean) is the mean over classes of per-class means over images;
  what is resampled is the per-image mean over classes (test_per_image.json). The two differ
  where a class is absent from some images, so each replicate is shifted by the difference of
  their plug-in values: the band is the bootstrap spread, centred on the mean that is plotted.
- Without per-image metrics the seeds alone are resampled; one such seed gives no band.

Pure pandas/numpy, tested on hand-made frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from semiseg import paired

BAND_COLUMNS = ["method", "label_fraction", "mean", "ci_low", "ci_high", "seeds", "resampled"]


@dataclass
class Resampled:
    """One (method, label fraction): the mean test Dice over its seeds and n_boot bootstrap
    replicates of it (None where nothing can be resampled), and what was resampled."""

    mean: float
    replicates: np.ndarray | None
    seeds: int
    resampled: str


def _image_groups(per_image: pd.DataFrame | None, trials: pd.DataFrame,
                  seeds: list[int]) -> list[np.ndarray] | None:
    """Per seed, its per-image dice_mean sorted by image id (repeated runs averaged); None
    unless every seed has some."""
    if per_image is None or per_image.empty or paired.IMAGE_KEY not in per_image:
        return None
    groups = []
    for seed in seeds:
        runs = trials.loc[trials["seed"] == seed, "run_id"]
        values = (per_image[per_image["run_id"].isin(list(runs))]
                  .groupby("id")[paired.IMAGE_KEY].mean().dropna().sort_index())
        if values.empty:
            return None
        groups.append(values.to_numpy(float))
    return groups


def resample(trials: pd.DataFrame, per_image: pd.DataFrame | None = None,
             n_boot: int = paired.N_BOOT, seed: int = paired.RNG_SEED) -> Resampled:
    """The trials of one (method, label fraction) at one method.params."""
    per_seed = trials.groupby("seed")["dice"].mean().sort_index()
    seeds = [int(s) for s in per_seed.index]
    mean = float(per_seed.mean())
    groups = _image_groups(per_image, trials, seeds)
    if groups is not None:
        sizes = sorted({len(g) for g in groups})
        count = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        text = f"{len(seeds)} seed{'s' * (len(seeds) > 1)} × {count} test images"
        plug_in = float(np.mean([g.mean() for g in groups]))
    elif len(seeds) > 1:
        groups = [np.array([v]) for v in per_seed.to_numpy(float)]
        text, plug_in = f"{len(seeds)} seeds only (no per-image test metrics)", mean
    else:
        return Resampled(mean, None, len(seeds), "1 seed, no per-image test metrics: no CI")
    replicates = paired.hierarchical_bootstrap(groups, n_boot, seed) + (mean - plug_in)
    return Resampled(mean, replicates, len(seeds), text)


def resample_all(chosen: pd.DataFrame, per_image: pd.DataFrame | None = None,
                 n_boot: int = paired.N_BOOT,
                 seed: int = paired.RNG_SEED) -> dict[tuple[str, float], Resampled]:
    """resample() for every (method, label fraction) of the val-selected trials `chosen`."""
    return {(str(m), float(f)): resample(group, per_image, n_boot, seed)
            for (m, f), group in chosen.groupby(["method", "label_fraction"])}


def curve_bands(chosen: pd.DataFrame, per_image: pd.DataFrame | None = None,
                n_boot: int = paired.N_BOOT, seed: int = paired.RNG_SEED) -> pd.DataFrame:
    """BAND_COLUMNS: the mean test Dice and its bootstrap 95 % CI (NaN: none) per setting."""
    rows = []
    for (method, fraction), r in resample_all(chosen, per_image, n_boot, seed).items():
        low, high = (np.percentile(r.replicates, [2.5, 97.5]) if r.replicates is not None
                     else (np.nan, np.nan))
        rows.append({"method": method, "label_fraction": fraction, "mean": r.mean,
                     "ci_low": float(low), "ci_high": float(high), "seeds": r.seeds,
                     "resampled": r.resampled})
    return pd.DataFrame(rows, columns=BAND_COLUMNS)


def dice_ci_cells(bands: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """Rows: methods; columns: label fractions; cells: (text, verdict) with text 'mean [low,
    high] (n=seeds)' and the paired verdict against supervised-only at that fraction ('' for
    supervised itself, n/a where it could not be judged)."""
    verdicts = {(r.method, float(r.label_fraction)): r.verdict for r in comparison.itertuples()}
    cells: dict[str, dict[float, tuple[str, str]]] = {}
    for r in bands.itertuples():
        ci = f" [{r.ci_low:.3f}, {r.ci_high:.3f}]" if np.isfinite(r.ci_low) else ""
        verdict = "" if r.method == paired.BASELINE else verdicts.get(
            (r.method, float(r.label_fraction)), paired.UNKNOWN)
        cells.setdefault(r.method, {})[float(r.label_fraction)] = (
            f"{r.mean:.3f}{ci} (n={r.seeds})", verdict)
    return pd.DataFrame.from_dict(cells, orient="index").sort_index().sort_index(axis=1)
