"""Runs -> tables and figures: test Dice by method x label fraction (mean ± std over seeds),
per-class Dice/HD95, the config per method selected on val, paired comparisons with
supervised-only (bootstrap CI and verdict, semiseg.paired), label-efficiency and pseudo-label
curves.

Only finished_trials, per_image_results and pseudo_histories read MLflow (through
semiseg.tracking); everything else works on plain DataFrames, so it is tested without a store.
Figures use matplotlib's Figure directly (no pyplot, no display), so they render headless and
in threads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from semiseg import paired, tracking

DICE = "metrics.test/dice_mean"
BASE = ["run_id", "method", "label_fraction", "seed", "params", "dice"]
PSEUDO_KEYS = ["pseudo/dice", "pseudo/coverage"]


def finished_trials(uri: str, experiment: str, parent_run_id: str | None = None,
                    config_hashes: Iterable[str] | None = None) -> pd.DataFrame:
    """FINISHED trials with test metrics (of one sweep, or of the given config hashes)."""
    runs = tracking.search_runs(uri, experiment, "trial", parent_run_id)
    return trials_from_runs(runs, config_hashes)


def trials_from_runs(runs: pd.DataFrame, config_hashes: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per finished trial: BASE columns, run_params (its params as {key: str}), then
    every metric under its logged name."""
    if runs.empty or DICE not in runs:
        return pd.DataFrame(columns=BASE)
    keep = (runs["status"] == "FINISHED") & runs[DICE].notna()
    if config_hashes is not None:
        hashes = runs.get(f"tags.{tracking.CONFIG_HASH_TAG}", pd.Series(None, index=runs.index))
        keep &= hashes.isin(list(config_hashes))
    runs = runs[keep]
    metrics = runs[[c for c in runs.columns if c.startswith("metrics.")]].astype(float)
    metrics.columns = [c[len("metrics."):] for c in metrics.columns]
    base = pd.DataFrame({
        "run_id": runs["run_id"],
        "method": runs["params.method.name"],
        "label_fraction": runs["params.data.label_fraction"].astype(float),
        "seed": runs["params.train.seed"].astype(int),
        "params": [method_params(row) for _, row in runs.iterrows()],
        "dice": runs[DICE].astype(float),
    })
    # The whole logged config, for what rebuilds a trial's data and model (report_gallery)
    # and reads its Ray resources; not a column per param, which would bury the metrics.
    base["run_params"] = [{k[len("params."):]: v for k, v in row.items()
                           if k.startswith("params.") and isinstance(v, str)}
                          for _, row in runs.iterrows()]
    return pd.concat([base, metrics], axis=1).reset_index(drop=True)


def method_params(row: pd.Series) -> str:
    """method.params as sorted JSON, whether logged whole as one JSON string or flattened to
    method.params.<name> keys (the config flattener does that to a non-empty dict)."""
    whole = row.get("params.method.params")
    if isinstance(whole, str) and whole.strip():
        parsed = _parse(whole)
        return json.dumps(parsed, sort_keys=True) if isinstance(parsed, dict) else whole
    prefix = "params.method.params."
    return json.dumps({k[len(prefix):]: _parse(v) for k, v in row.items()
                       if k.startswith(prefix) and isinstance(v, str)}, sort_keys=True)


def _parse(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def dice_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows: methods; columns: label fractions; cells: 'mean ± std (n)' of test Dice."""
    if trials.empty:
        return pd.DataFrame()
    stats = trials.groupby(["method", "label_fraction"])["dice"].agg(["mean", "std", "count"])
    cell = stats.apply(
        lambda r: f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["count"] > 1 else "")
        + f" (n={int(r['count'])})", axis=1,
    )
    table = cell.unstack("label_fraction")
    table.columns = [f"{c:g}" for c in table.columns]
    return table


def format_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "no finished trials with test metrics yet"
    header = "test Dice (mean over foreground classes) by label fraction\n"
    return header + table.to_string(na_rep="-")


def summary(trials: pd.DataFrame, value: str = "dice") -> pd.DataFrame:
    """method, label_fraction, mean, std (0 for a single seed), n: one row per setting."""
    stats = trials.groupby(["method", "label_fraction"])[value].agg(["mean", "std", "count"])
    return stats.rename(columns={"count": "n"}).fillna({"std": 0.0}).reset_index()


def full_supervision(trials: pd.DataFrame) -> float | None:
    """Mean test Dice of supervised at label fraction 1.0: the level to close the gap to."""
    full = trials[(trials["method"] == "supervised") & np.isclose(trials["label_fraction"], 1.0)]
    return float(full["dice"].mean()) if len(full) else None


def cell(values: pd.Series, digits: int = 3) -> str:
    """'mean ± std' over the finite values ('mean' alone for one value, '-' for none)."""
    v = pd.to_numeric(values, errors="coerce").astype(float)
    v = v[np.isfinite(v)]
    if v.empty:
        return "-"
    text = f"{v.mean():.{digits}f}"
    return text + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")


def per_class_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per method x label fraction: mean and per-class test Dice and HD95 (pixels)."""
    classes = [c.split("/", 2)[2] for c in trials.columns if c.startswith("test/dice/")]
    columns = {"Dice (mean)": "test/dice_mean", "HD95 (mean)": "test/hd95_mean"}
    columns.update({f"Dice {c}": f"test/dice/{c}" for c in classes})
    columns.update({f"HD95 {c}": f"test/hd95/{c}" for c in classes})
    rows = []
    for (method, fraction), group in trials.groupby(["method", "label_fraction"]):
        row = {"method": method, "label fraction": percent(fraction), "seeds": len(group)}
        row.update({label: cell(group[key], 3 if label.startswith("Dice") else 1)
                    for label, key in columns.items() if key in group})
        rows.append(row)
    return pd.DataFrame(rows)


def best_configs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per method x label fraction, the method.params with the highest val Dice averaged over
    seeds (paired.select_on_val: chosen on val, never on test), and its test Dice: method,
    label_fraction, params, val_mean (the selection key), dice_mean, dice_std, seeds,
    configs (how many were tried)."""
    stats = (trials.assign(_val=paired.val_scores(trials))
             .groupby(["method", "label_fraction", "params"])
             .agg(val_mean=("_val", "mean"), dice_mean=("dice", "mean"), dice_std=("dice", "std"),
                  seeds=("dice", "count")).reset_index())
    tried = stats.groupby(["method", "label_fraction"])["params"].transform("size")
    chosen = paired.select_on_val(trials)[["method", "label_fraction", "params"]].drop_duplicates()
    best = stats.assign(configs=tried).merge(chosen, on=["method", "label_fraction", "params"])
    return best.sort_values(["method", "label_fraction"]).reset_index(drop=True)


def per_image_results(uri: str, trials: pd.DataFrame) -> pd.DataFrame:
    """Per-test-image metrics (run_id, id, dice_mean, ...) of the trials that logged them; an
    empty frame when none did, and the paired CIs then resample seeds only."""
    if trials.empty:
        return pd.DataFrame(columns=["run_id", "id"])
    return tracking.per_image_metrics(uri, trials["run_id"].tolist())


def comparisons(trials: pd.DataFrame, per_image: pd.DataFrame | None = None) -> pd.DataFrame:
    """paired.paired_comparisons: each method against supervised-only, same fraction/seeds."""
    return paired.paired_comparisons(trials, per_image)


def paired_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """The comparisons as display strings: per-seed differences, mean, 95 % CI, verdict."""
    def signed(value: float) -> str:
        return f"{value:+.3f}" if np.isfinite(value) else "-"

    return pd.DataFrame({
        "method": comparison["method"],
        "label fraction": comparison["label_fraction"].map(percent),
        "method.params": comparison["params"].map(lambda p: "defaults" if p in ("{}", "") else p),
        "Δ test Dice per seed": comparison["per_seed"].map(
            lambda d: ", ".join(f"s{s}: {signed(v)}" for s, v in d.items()) or "-"),
        "mean Δ": comparison["mean_diff"].map(signed),
        "95% CI": [f"[{signed(lo)}, {signed(hi)}]" if np.isfinite(lo) else "-"
                   for lo, hi in zip(comparison["ci_low"], comparison["ci_high"])],
        "resampled": comparison["resampled"],
        "verdict": comparison["verdict"],
    })


def format_paired(comparison: pd.DataFrame) -> str:
    if comparison.empty:
        return "no method to compare with supervised-only at the same label fraction"
    header = ("paired against supervised-only at the same label fraction and seeds (Δ = method "
              "- supervised test Dice; bootstrap 95 % CI over seeds x test images)\n")
    return header + paired_table(comparison).to_string(index=False)


def text_report(trials: pd.DataFrame, per_image: pd.DataFrame | None = None) -> str:
    """What `semiseg report` prints: the test Dice table of the val-selected configs, then the
    paired comparisons with their CI and verdict."""
    chosen = paired.select_on_val(trials)
    return (format_table(dice_table(chosen)) + "\n(each cell: the method.params selected on val)\n\n"
            + format_paired(comparisons(trials, per_image)))


def _colors(methods: Iterable[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(methods)))}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def plot_label_efficiency(trials: pd.DataFrame, path: Path,
                          bands: pd.DataFrame | None = None) -> Path:
    """Test Dice vs label fraction (log x), one line per method; with `bands`
    (report_bands.curve_bands) the mean over seeds with its bootstrap 95 % CI as error bars and
    a band, else ± std over seeds; full supervision as a dashed horizontal line."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    stats = summary(trials)
    if bands is not None:
        stats = stats.merge(bands[["method", "label_fraction", "ci_low", "ci_high"]],
                            on=["method", "label_fraction"], how="left")
    else:
        stats = stats.assign(ci_low=stats["mean"] - stats["std"], ci_high=stats["mean"] + stats["std"])
    colors = _colors(stats["method"])
    markers = dict(zip(colors, "osD^vP*X"))  # so that coinciding lines stay distinguishable
    for method, s in stats.groupby("method"):
        s = s.sort_values("label_fraction")
        x, mean = s["label_fraction"], s["mean"]
        low, high = s["ci_low"].fillna(mean), s["ci_high"].fillna(mean)  # no CI: the point alone
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker=markers[method], ms=6,
                    capsize=3, alpha=0.9, color=colors[method], label=method)
        ax.fill_between(x, low, high, color=colors[method], alpha=0.15, lw=0)
    full = full_supervision(trials)
    if full is not None:
        ax.axhline(full, ls="--", lw=1.2, color="0.35", label=f"full supervision ({full:.3f})")
    fractions = sorted(stats["label_fraction"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(fractions))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([percent(f) for f in fractions])
    if len(fractions) == 1:  # a log axis needs some width around a single point
        ax.set_xlim(fractions[0] / 2, min(fractions[0] * 2, 2.0))
    ax.set_xlabel("labeled fraction of the training images (log scale)")
    ax.set_ylabel("test Dice (mean over foreground classes)")
    ax.set_title("Label efficiency: mean over seeds, " + (
        "bootstrap 95 % CI (seeds × test images)" if bands is not None else "± std"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return Path(path)


def pseudo_histories(uri: str, trials: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch pseudo/dice and pseudo/coverage of the trials that logged them."""
    logged = [k for k in PSEUDO_KEYS if k in trials.columns]
    run_ids = trials.loc[trials[logged].notna().any(axis=1), "run_id"].tolist() if logged else []
    return tracking.metric_histories(uri, run_ids, PSEUDO_KEYS)


def plot_pseudo_quality(history: pd.DataFrame, trials: pd.DataFrame, path: Path) -> Path | None:
    """pseudo/dice and pseudo/coverage over epochs, one line per method x label fraction
    (mean over seeds); None (and no file) when no trial logged pseudo-label metrics."""
    from matplotlib.ticker import MaxNLocator

    history = history[np.isfinite(history["value"].astype(float))]
    if history.empty:
        return None
    curves = (history.merge(trials[["run_id", "method", "label_fraction"]], on="run_id")
              .groupby(["key", "method", "label_fraction", "step"])["value"].mean().reset_index())
    colors = _colors(trials["method"])
    fractions = sorted(curves["label_fraction"].unique())
    styles = ["-", "--", ":", "-."]
    fig = _figure(11, 3.9)
    titles = ("pseudo-label Dice vs hidden masks", "coverage: fraction of unlabeled pixels used")
    for ax, key, title in zip(fig.subplots(1, 2), PSEUDO_KEYS, titles):
        for (method, fraction), c in curves[curves["key"] == key].groupby(["method", "label_fraction"]):
            ax.plot(c["step"], c["value"], marker="o", ms=3, color=colors[method],
                    ls=styles[fractions.index(fraction) % len(styles)],
                    label=f"{method} @ {percent(fraction)} labels")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return Path(path)
