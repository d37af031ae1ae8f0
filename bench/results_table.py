"""Markdown for docs/RESULTS.md from an experiment's MLflow runs: test Dice at one label
fraction (mean ± std over seeds), the share of the supervised → full-supervision gap each method
closes (over the seeds every one of the three finished), the paired difference with supervised-only (bootstrap 95 % CI over seeds × test images
and a verdict, semiseg.paired), the final-epoch model's test Dice beside the val-selected one, and
the last-epoch pseudo-label Dice/coverage. Each method is
shown at its method.params selected on val.

    python bench/results_table.py results_synthetic --uri sqlite:////abs/mlruns/mlflow.db
"""

from __future__ import annotations

import argparse

import pandas as pd

from semiseg import tracking
from semiseg.paired import select_on_val
from semiseg.report import comparisons, finished_trials, per_image_results

FINAL_DICE = "test_final/dice_mean"  # engine.fit scores the last epoch's model under test_final/


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--uri", default="")
    p.add_argument("--fraction", type=float, default=0.05)
    args = p.parse_args()
    uri = tracking.resolve_uri(args.uri)
    trials = select_on_val(finished_trials(uri, args.experiment))
    full_rows = trials[(trials.method == "supervised") & (trials.label_fraction == 1.0)]
    full = full_rows["dice"]
    low = trials[trials.label_fraction == args.fraction]
    sup = low[low.method == "supervised"].set_index("seed")["dice"]
    full_by_seed = full_rows.set_index("seed")["dice"]
    last = _last_pseudo(uri, args.experiment, args.fraction)
    paired = comparisons(low, per_image_results(uri, low)).set_index("method")
    print(f"| method | test Dice @ {args.fraction:g} (mean ± std, n) | per seed | gap closed | "
          "Δ vs supervised [95 % CI] | verdict | final-epoch test Dice | "
          "pseudo-label Dice / coverage (last epoch) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, group in low.groupby("method"):
        d = group.sort_values("seed")["dice"]
        gap = _gap_closed(group.set_index("seed")["dice"], sup, full_by_seed)
        pq = last.get(method)
        pq_text = f"{pq[0]:.3f} / {pq[1]:.2f}" if pq else "-"
        print(f"| {method} | {d.mean():.3f} ± {d.std():.3f} ({len(d)}) | "
              f"{', '.join(f'{v:.3f}' for v in d)} | {gap} | {_paired_cells(paired, method)} | "
              f"{_final_epoch(group)} | {pq_text} |")
    print(f"| supervised, all labels | {full.mean():.3f} ± {full.std():.3f} ({len(full)}) | "
          f"{', '.join(f'{v:.3f}' for v in full)} | 100% | - | - | {_final_epoch(full_rows)} | - |")
    if len(paired):
        print(f"\nCI resampled over: {'; '.join(sorted(set(paired['resampled'])))}")
    _sam_table(uri, args.experiment, args.fraction)


def _gap_closed(method: pd.Series, sup: pd.Series, full: pd.Series) -> str:
    """(method - supervised) / (full - supervised) over the seeds all three finished (paired: a
    seed that only some of them ran would tilt it), with the count where seeds are missing."""
    seeds = method.index.intersection(sup.index).intersection(full.index)
    if seeds.empty:
        return "-"
    gap = (method[seeds] - sup[seeds]).mean() / (full[seeds] - sup[seeds]).mean()
    everyone = method.index.union(sup.index).union(full.index)
    return f"{gap:+.0%}" + ("" if len(seeds) == len(everyone) else f" (seeds {', '.join(map(str, seeds))})")


def _final_epoch(group: pd.DataFrame) -> str:
    """Mean test Dice of the last epoch's model, beside the val-selected one: a large gap says
    selection on val mattered (or that val and test disagree)."""
    final = group.get(FINAL_DICE)
    return "-" if final is None or final.isna().all() else f"{final.mean():.3f}"


def _paired_cells(paired: pd.DataFrame, method: str) -> str:
    """'+0.012 [-0.004, +0.029] | within noise', or '- | -' for the baseline itself."""
    if method not in paired.index:
        return "- | -"
    row = paired.loc[method]
    if pd.isna(row.mean_diff):
        return f"- | {row.verdict}"
    ci = f" [{row.ci_low:+.3f}, {row.ci_high:+.3f}]" if pd.notna(row.ci_low) else ""
    return f"{row.mean_diff:+.3f}{ci} | {row.verdict}"


def _sam_table(uri: str, experiment: str, fraction: float) -> None:
    """sam_refined trials: pseudo-label Dice of the coarse U-Net and after SAM, per class."""
    runs = tracking.search_runs(uri, experiment)
    runs = runs[(runs["status"] == "FINISHED") & (runs.get("params.method.name") == "sam_refined")
                & (runs["params.data.label_fraction"].astype(float) == fraction)]
    if runs.empty or "metrics.sam/dice_before" not in runs:
        return
    classes = sorted(c.split("/")[-1] for c in runs.columns if c.startswith("metrics.sam/dice_before/"))
    print("\n| seed | pseudo-label Dice: coarse U-Net → after SAM | "
          + " | ".join(f"{c}: before → after" for c in classes) + " |")
    print("|---|---|" + "---|" * len(classes))
    for _, run in runs.sort_values("params.train.seed").iterrows():
        cells = [f"{run[f'metrics.sam/dice_before/{c}']:.3f} → {run[f'metrics.sam/dice_after/{c}']:.3f}"
                 for c in classes]
        print(f"| {run['params.train.seed']} | {run['metrics.sam/dice_before']:.3f} → "
              f"{run['metrics.sam/dice_after']:.3f} | " + " | ".join(cells) + " |")

def _last_pseudo(uri: str, experiment: str, fraction: float) -> dict[str, tuple[float, float]]:
    runs = tracking.search_runs(uri, experiment)
    runs = runs[(runs["status"] == "FINISHED")
                & (runs["params.data.label_fraction"].astype(float) == fraction)]
    out: dict[str, tuple[float, float]] = {}
    if "metrics.pseudo/dice" not in runs:
        return out
    for method, group in runs.groupby("params.method.name"):
        vals = group[["metrics.pseudo/dice", "metrics.pseudo/coverage"]].dropna()
        if len(vals):
            out[method] = (float(vals.iloc[:, 0].mean()), float(vals.iloc[:, 1].mean()))
    return out


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    main()
