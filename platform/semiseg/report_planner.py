"""The label-budget planner: how many labeled images (or cases) each method needs to reach 90 %
and 95 % of full supervision's test Dice, with a bootstrap 95 % CI, and whether that answer is
an extrapolation beyond the swept budgets.

Per method, a saturating learning curve is fitted to its test Dice against the labeled count
across the swept label fractions and seeds: the inverse power law

    Dice(n) = a - b * n**(-c),   b >= 0, c > 0

(a: the ceiling, c: how fast it is approached), the curve that Figueroa et al. 2012 ("Predicting
sample size required for classification performance", BMC Med Inform Decis Mak 12:8) and Cho
et al. 2015 ("How much data is needed to train a medical image deep learning system to achieve
necessary high accuracy?", arXiv:1511.06348) fit to medical learning curves. Its inverse gives
the budget for a target T < a: n = (b / (a - T))**(1/c); at T >= a it is never reached.
Full supervision is supervised-only at label fraction 1.0, as everywhere in the report.
A method whose Dice falls with more labels gets no curve (n/a, the fit's b clips at 0), and
a fit whose weighted RMS residual exceeds POOR_FIT says so in its status.

Fitting: weighted least squares on the per-fraction mean Dice (weights: seeds), exactly for
(a, b) at each c of a log grid (C_GRID) and the c with the least error kept; no iterative
optimiser, so every bootstrap replicate is fitted at once. The CI refits the curve on each
replicate of report_bands.resample_all (paired.hierarchical_bootstrap over seeds, then test
images), whose draws are shared by every setting with the same seeds and test images: one
replicate resamples the method's curve and the full-supervision level together.

Deviations: Figueroa et al. weight points by their inverse variance and give a CI from the
fit's own covariance; here the weights are seed counts and the CI is the bootstrap's (it holds
test-image and seed noise, not only the fit's). Three parameters need at least three swept
budgets; with three the curve passes through them. The labeled count is split_summary.json's
(its label unit: images, or cases with data.label_unit=case); runs without one fall back to the
label fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from semiseg import paired
from semiseg.report_bands import Resampled

TARGETS = (0.90, 0.95)
C_GRID = np.geomspace(0.02, 4.0, 240)  # exponents of the power law the fit chooses from
MIN_BUDGETS = 3
POOR_FIT = 0.03  # weighted RMS residual (Dice) of the fit to the per-fraction means, flagged
COLUMNS = ["method", "target", "target_dice", "labels", "ci_low", "ci_high", "swept_min",
           "swept_max", "unit", "status", "fit_rms", "a", "b", "c"]


@dataclass
class Fit:
    """Power-law parameters, one per replicate (arrays of one value for a point fit)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray

    def dice(self, counts: np.ndarray) -> np.ndarray:
        return self.a[:, None] - self.b[:, None] * np.power(counts[None, :], -self.c[:, None])


def fit_power_law(counts: np.ndarray, dice: np.ndarray, weights: np.ndarray | None = None) -> Fit:
    """Weighted least squares of dice (F,) or (B, F) replicates at counts (F,); see the module
    docstring. b < 0 (Dice falling with labels) is clipped to a flat curve at the mean."""
    counts = np.asarray(counts, float)
    y = np.atleast_2d(np.asarray(dice, float))
    if len(np.unique(counts)) < MIN_BUDGETS or np.any(counts <= 0):
        raise ValueError(f"fit_power_law needs {MIN_BUDGETS} distinct positive counts, got "
                         f"{sorted(counts.tolist())}")
    w = np.ones_like(counts) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    y_mean = y @ w                                           # (B,)
    best_sse = np.full(len(y), np.inf)
    a_best, b_best, c_best = (np.zeros(len(y)) for _ in range(3))
    for c in C_GRID:
        x = counts ** -c
        xc = x - x @ w
        slope = np.minimum((y - y_mean[:, None]) @ (w * xc) / (w @ xc ** 2), 0.0)  # b = -slope
        a = y_mean - slope * (x @ w)
        sse = ((y - a[:, None] - slope[:, None] * x) ** 2) @ w
        better = sse < best_sse - 1e-15                      # ties keep the smaller c
        best_sse = np.where(better, sse, best_sse)
        a_best, b_best = np.where(better, a, a_best), np.where(better, -slope, b_best)
        c_best = np.where(better, c, c_best)
    return Fit(a_best, b_best, c_best)


def labels_needed(fit: Fit, target: np.ndarray | float) -> np.ndarray:
    """The count at which each fitted curve reaches `target`; inf where it never does."""
    target = np.broadcast_to(np.asarray(target, float), fit.a.shape)
    gap = fit.a - target
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.power(fit.b / gap, 1.0 / fit.c)
    return np.where((gap > 0) & (fit.b > 0), n, np.where(gap > 0, 0.0, np.inf))


def labeled_counts(trials: pd.DataFrame, summaries: dict[str, dict]) -> pd.DataFrame:
    """trials plus `count` and `unit` columns: the labeled images, or cases where the split drew
    cases (split_summary.json's labeling.unit), else the label fraction (unit 'fraction')."""
    counts, units = [], []
    for row in trials.itertuples():
        summary = summaries.get(row.run_id) or {}
        labeled = summary.get("labeled")
        unit = (summary.get("labeling") or {}).get("unit", "image")
        if not isinstance(labeled, dict):
            counts.append(float(row.label_fraction))
            units.append("fraction")
            continue
        counts.append(float(labeled["groups" if unit == "case" else "images"]))
        units.append(unit)
    return trials.assign(count=counts, unit=units)


def plan(chosen: pd.DataFrame, resampled: dict[tuple[str, float], Resampled],
         targets: tuple[float, ...] = TARGETS) -> pd.DataFrame:
    """COLUMNS, one row per method x target. `chosen`: the val-selected trials with `count`
    and `unit` (labeled_counts); `resampled`: report_bands.resample_all of the same trials."""
    full = resampled.get((paired.BASELINE, 1.0))
    rows = []
    for method, group in chosen.groupby("method"):
        rows += _method_rows(str(method), group, resampled, full, targets)
    return pd.DataFrame(rows, columns=COLUMNS)


def _method_rows(method: str, group: pd.DataFrame, resampled: dict[tuple[str, float], Resampled],
                 full: Resampled | None, targets: tuple[float, ...]) -> list[dict]:
    points = group.groupby("label_fraction")["count"].mean().sort_index()
    units = sorted(set(group["unit"]))
    base = {"method": method, "swept_min": points.min(), "swept_max": points.max(),
            "unit": "/".join(units)}
    settings = [resampled[(method, float(f))] for f in points.index]
    reason = None
    if full is None:
        reason = f"n/a: no {paired.BASELINE} run at label fraction 1.0 (sweep.full_supervision)"
    elif len(units) > 1:
        reason = f"n/a: its runs count labels in different units ({', '.join(units)})"
    elif points.nunique() < MIN_BUDGETS:
        reason = (f"n/a: {points.nunique()} swept budget(s); the curve needs {MIN_BUDGETS} "
                  "(more sweep.label_fractions)")
    if reason is None:
        counts = points.to_numpy(float)
        weights = np.array([s.seeds for s in settings], float)
        means = np.array([s.mean for s in settings])
        point = fit_power_law(counts, means, weights)
        if point.b[0] <= 0:
            reason = ("n/a: its test Dice does not rise with the labeled count over the swept "
                      "budgets, so no saturating curve fits")
    if reason:
        return [{**base, "target": t, "target_dice": t * full.mean if full else np.nan,
                 "labels": np.nan, "ci_low": np.nan, "ci_high": np.nan, "status": reason}
                for t in targets]
    rms = float(np.sqrt(np.average((means - point.dice(counts)[0]) ** 2, weights=weights)))
    boot = None
    if all(s.replicates is not None for s in settings) and full.replicates is not None:
        boot = fit_power_law(counts, np.stack([s.replicates for s in settings], axis=1), weights)
    rows = []
    for t in targets:
        estimate = float(labels_needed(point, t * full.mean)[0])
        low = high = np.nan
        if boot is not None:
            needed = labels_needed(boot, t * full.replicates)
            low, high = (float(np.quantile(needed, q, method="inverted_cdf")) for q in (0.025, 0.975))
        rows.append({**base, "target": t, "target_dice": t * full.mean, "labels": estimate,
                     "ci_low": low, "ci_high": high,
                     "status": _status(estimate, high, point, t * full.mean, points)
                     + (f"; poor fit (RMS residual {rms:.3f})" if rms > POOR_FIT else ""),
                     "fit_rms": rms, "a": float(point.a[0]), "b": float(point.b[0]),
                     "c": float(point.c[0])})
    return rows


def _status(estimate: float, high: float, fit: Fit, target: float, points: pd.Series) -> str:
    if not np.isfinite(estimate):
        return f"not reached: the fitted ceiling {fit.a[0]:.3f} is below the target {target:.3f}"
    if estimate > points.max():
        return "extrapolated beyond the swept range"
    if estimate < points.min():
        return "extrapolated below the smallest swept budget"
    if np.isfinite(high) and high > points.max():
        return "within the swept range; the CI reaches beyond it"
    return "within the swept range"


def unit_label(unit: str) -> str:
    return {"image": "labeled images", "case": "labeled cases",
            "fraction": "label fraction"}.get(unit, unit)


def format_count(value: float, unit: str) -> str:
    if not np.isfinite(value):
        return "never" if value > 0 else "-"
    if unit == "fraction":
        return f"{value * 100:.3g}%"
    return f"{int(np.ceil(value - 1e-9))}"


def plot_planner(chosen: pd.DataFrame, planned: pd.DataFrame, path: Path) -> Path | None:
    """Test Dice per trial against its labeled count (log x), each method's fitted curve (solid
    over the swept range, dotted beyond), the target levels, and each budget with its CI.
    None (and no file) when no method could be fitted."""
    from semiseg.report import _colors, _figure

    fitted = planned.dropna(subset=["a"])
    if fitted.empty:
        return None
    fig = _figure(7.5, 4.4)
    ax = fig.add_subplot()
    colors = _colors(chosen["method"])
    x_max = max(chosen["count"].max(), np.nanmax(np.where(np.isfinite(fitted["labels"]), fitted["labels"], 0)))
    grid = np.geomspace(chosen["count"].min() / 1.5, x_max * 1.5, 200)
    for method, rows in fitted.groupby("method"):
        first = rows.iloc[0]
        curve = Fit(np.array([first.a]), np.array([first.b]), np.array([first.c])).dice(grid)[0]
        inside = (grid >= first.swept_min) & (grid <= first.swept_max)
        ax.plot(grid[inside], curve[inside], color=colors[method], lw=1.8, label=f"{method} (fit)")
        ax.plot(grid, np.where(inside, np.nan, curve), color=colors[method], lw=1.2, ls=":")
        for row in rows.itertuples():
            if np.isfinite(row.labels):
                xerr = None
                if np.isfinite(row.ci_low):
                    high = row.ci_high if np.isfinite(row.ci_high) else grid[-1]
                    xerr = [[row.labels - row.ci_low], [high - row.labels]]
                ax.errorbar([row.labels], [row.target_dice], xerr=xerr, marker="v", ms=7,
                            capsize=3, color=colors[method], lw=1)
    trials = chosen[chosen["method"].isin(fitted["method"])]
    for method, group in trials.groupby("method"):
        ax.scatter(group["count"], group["dice"], s=14, color=colors[method], alpha=0.7, zorder=3)
    for target, level in fitted.groupby("target")["target_dice"].first().items():
        ax.axhline(level, color="0.45", lw=0.9, ls="--")
        ax.annotate(f"{target:.0%} of full supervision", (grid[0], level), fontsize=7,
                    color="0.3", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel(f"{unit_label(fitted['unit'].iloc[0])} (log scale)")
    ax.set_ylabel("test Dice")
    ax.set_title("Label budget: fitted curves, ▼ labels needed (bootstrap 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path)
    return Path(path)
