"""Runs -> tables: test Dice by method x label fraction, mean ± std over seeds."""

from __future__ import annotations

import pandas as pd

from semiseg import tracking

DICE = "metrics.test/dice_mean"


def finished_trials(uri: str, experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    runs = tracking.search_runs(uri, experiment, "trial", parent_run_id)
    if runs.empty or DICE not in runs:
        return pd.DataFrame(columns=["method", "label_fraction", "seed", "dice"])
    runs = runs[(runs["status"] == "FINISHED") & runs[DICE].notna()]
    return pd.DataFrame({
        "method": runs["params.method.name"],
        "label_fraction": runs["params.data.label_fraction"].astype(float),
        "seed": runs["params.train.seed"].astype(int),
        "dice": runs[DICE].astype(float),
    })


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
