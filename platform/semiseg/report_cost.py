"""What each setting cost, and the Dice it gained per extra compute-hour against supervised-only.

Per trial, the resource-seconds Ray reserved for it (cost/cpu_s, cost/gpu_s; logged by
semiseg.distributed.cost: wall time x the CPUs/GPUs of its workers), as hours, mean over seeds.
The gain is the paired Δ test Dice against supervised-only at the same label fraction and seeds
(semiseg.paired, with its bootstrap CI); the extra compute is the method's hours minus
supervised's, in GPU-hours where either reserved a GPU, else CPU-hours. Dice per extra hour =
Δ / extra hours, its CI the Δ's CI divided by the same hours (the hours are measured, not
resampled). A method that costs no more than supervised gains for free, and says so instead of
dividing by ~0. Runs logged before semiseg measured cost have none, and their cells say so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from semiseg import paired

CPU, GPU = "cost/cpu_s", "cost/gpu_s"
COLUMNS = ["method", "label_fraction", "seeds", "cpu_h", "gpu_h", "baseline_h", "unit",
           "extra_h", "mean_diff", "ci_low", "ci_high", "per_hour", "per_hour_low",
           "per_hour_high", "note"]


def _hours(trials: pd.DataFrame, key: str) -> float:
    if key not in trials:
        return np.nan
    values = pd.to_numeric(trials[key], errors="coerce").dropna()
    return float(values.mean()) / 3600.0 if len(values) else np.nan


def cost_table(chosen: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """COLUMNS per (method, label fraction) of the val-selected trials; comparison:
    paired.paired_comparisons of the same trials (its Δ and CI)."""
    paired_rows = {(r.method, float(r.label_fraction)): r for r in comparison.itertuples()}
    rows = []
    for (method, fraction), group in chosen.groupby(["method", "label_fraction"]):
        base = chosen[(chosen["method"] == paired.BASELINE)
                      & np.isclose(chosen["label_fraction"], fraction)]
        cpu, gpu = _hours(group, CPU), _hours(group, GPU)
        row = {"method": method, "label_fraction": float(fraction), "seeds": len(group),
               "cpu_h": cpu, "gpu_h": gpu}
        rows.append({**row, **_gain(method, group, base, paired_rows.get((method, float(fraction))))})
    return pd.DataFrame(rows, columns=COLUMNS)


def _gain(method: str, group: pd.DataFrame, base: pd.DataFrame, compared) -> dict:
    empty = {k: np.nan for k in COLUMNS[5:-1]} | {"unit": ""}
    if method == paired.BASELINE:
        return {**empty, "note": "the baseline"}
    if base.empty or compared is None:
        return {**empty, "note": f"no {paired.BASELINE} run at this label fraction"}
    uses_gpu = (_hours(group, GPU) or 0) > 0 or (_hours(base, GPU) or 0) > 0
    unit, key = ("GPU-h", GPU) if uses_gpu else ("CPU-h", CPU)
    mine, theirs = _hours(group, key), _hours(base, key)
    out = {**empty, "unit": unit, "baseline_h": theirs, "mean_diff": compared.mean_diff,
           "ci_low": compared.ci_low, "ci_high": compared.ci_high}
    if not (np.isfinite(mine) and np.isfinite(theirs)):
        return {**out, "note": "no cost logged (runs older than cost/cpu_s)"}
    extra = mine - theirs
    out["extra_h"] = extra
    if extra <= 0:
        return {**out, "note": "no extra compute: the gain is free"}
    return {**out, "per_hour": compared.mean_diff / extra, "per_hour_low": compared.ci_low / extra,
            "per_hour_high": compared.ci_high / extra, "note": compared.verdict}


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The cost table as display strings."""
    def num(value: float, spec: str) -> str:
        return format(value, spec) if np.isfinite(value) else "-"

    def interval(low: float, high: float, spec: str) -> str:
        return f"[{num(low, spec)}, {num(high, spec)}]" if np.isfinite(low) else "-"

    return pd.DataFrame({
        "method": table["method"],
        "label fraction": table["label_fraction"].map(lambda f: f"{f * 100:g}%"),
        "seeds": table["seeds"],
        "CPU-h per trial": table["cpu_h"].map(lambda v: num(v, ".4f")),
        "GPU-h per trial": table["gpu_h"].map(lambda v: num(v, ".4f")),
        "extra compute vs supervised": [f"{num(e, '+.4f')} {u}".strip() if u else "-"
                                        for e, u in zip(table["extra_h"], table["unit"])],
        "Δ test Dice [95% CI]": [f"{num(m, '+.3f')} {interval(lo, hi, '+.3f')}" if np.isfinite(m)
                                 else "-" for m, lo, hi in
                                 zip(table["mean_diff"], table["ci_low"], table["ci_high"])],
        "Δ Dice per extra compute-hour [95% CI]": [
            f"{num(p, '+.3f')} {interval(lo, hi, '+.3f')}" if np.isfinite(p) else "-"
            for p, lo, hi in zip(table["per_hour"], table["per_hour_low"], table["per_hour_high"])],
        "note": table["note"],
    })
