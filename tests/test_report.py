"""report.py and dashboard.py on hand-built DataFrames: no MLflow, no Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semiseg import report
from semiseg.dashboard import render_page, write_dashboard


def _trial(method: str, fraction: float, seed: int, dice: float, params: str = "{}",
           val: float | None = None) -> dict:
    return {"run_id": f"{method}-{fraction}-{seed}-{params}", "method": method,
            "label_fraction": fraction, "seed": seed, "params": params, "dice": dice,
            "best_val_dice": dice if val is None else val,
            "test/dice_mean": dice, "test/hd95_mean": 10 * (1 - dice),
            "test/dice/lung": dice + 0.05, "test/dice/heart": dice - 0.05,
            "test/hd95/lung": 4.0 + seed, "test/hd95/heart": np.nan if seed else 8.0}


@pytest.fixture
def trials() -> pd.DataFrame:
    rows = [_trial("supervised", f, s, d + 0.02 * s)
            for f, d in ((0.1, 0.6), (1.0, 0.9)) for s in (0, 1)]
    rows += [_trial("pseudo_label", 0.1, s, d + 0.02 * s, json.dumps({"threshold": t}))
             for t, d in ((0.9, 0.70), (0.95, 0.66)) for s in (0, 1)]
    return pd.DataFrame(rows)


@pytest.fixture
def history(trials: pd.DataFrame) -> pd.DataFrame:
    runs = trials.loc[trials["method"] == "pseudo_label", "run_id"]
    rows = [{"run_id": r, "key": k, "step": e, "value": 0.5 + 0.1 * e}
            for r in runs for k in report.PSEUDO_KEYS for e in range(3)]
    return pd.DataFrame(rows)


def test_dice_table_is_mean_and_std_over_seeds(trials: pd.DataFrame) -> None:
    table = report.dice_table(trials)
    assert list(table.columns) == ["0.1", "1"]
    assert table.loc["supervised", "0.1"] == "0.610 ± 0.014 (n=2)"  # std of 0.60, 0.62
    assert table.loc["supervised", "1"] == "0.910 ± 0.014 (n=2)"
    assert pd.isna(table.loc["pseudo_label", "1"])
    assert "pseudo_label" in report.format_table(table)


def test_single_seed_cell_has_no_std() -> None:
    table = report.dice_table(pd.DataFrame([_trial("supervised", 0.5, 0, 0.7)]))
    assert table.loc["supervised", "0.5"] == "0.700 (n=1)"


def test_best_config_is_highest_mean_over_seeds(trials: pd.DataFrame) -> None:
    best = report.best_configs(trials)
    assert len(best) == 3  # one per method x label fraction
    row = best[best["method"] == "pseudo_label"].iloc[0]
    assert json.loads(row["params"]) == {"threshold": 0.9}
    assert row["dice_mean"] == pytest.approx(0.71) and row["val_mean"] == pytest.approx(0.71)
    assert row["seeds"] == 2 and row["configs"] == 2


def test_best_config_is_chosen_on_val_not_on_test(trials: pd.DataFrame) -> None:
    """Threshold 0.95 now has the better val Dice but the worse test Dice: it is chosen, and
    reported with its own test Dice, in the table and on the page."""
    val = np.where(trials["params"].str.contains("0.95"), 0.9, trials["dice"])
    trials = trials.assign(best_val_dice=val)
    row = report.best_configs(trials).query("method == 'pseudo_label'").iloc[0]
    assert json.loads(row["params"]) == {"threshold": 0.95}
    assert row["val_mean"] == pytest.approx(0.9) and row["dice_mean"] == pytest.approx(0.67)
    table = report.dice_table(paired_select(trials))
    assert table.loc["pseudo_label", "0.1"] == "0.670 ± 0.014 (n=2)"  # not the mix of both
    best_rows = _rows(render_page(trials, "exp"), "best-configs")
    assert any('{"threshold": 0.95}' in r and "0.900" in r for r in best_rows)


def paired_select(trials: pd.DataFrame) -> pd.DataFrame:
    from semiseg.paired import select_on_val

    return select_on_val(trials)


def test_text_report_has_ci_and_verdict(trials: pd.DataFrame) -> None:
    """pseudo_label (threshold 0.9) beats supervised by +0.10 on both seeds, every test image
    by the same amount: a zero-width CI at +0.10 and the verdict better."""
    chosen = paired_select(trials)
    per_image = pd.DataFrame([{"run_id": r, "id": f"i{i}", "dice_mean": d + 0.01 * i}
                              for r, d in zip(chosen["run_id"], chosen["dice"]) for i in range(3)])
    text = report.text_report(trials, per_image)
    assert "0.710 ± 0.014 (n=2)" in text and "0.690" not in text  # the val-selected config only
    paired_part = text.split("paired against supervised-only")[1]
    line = next(l for l in paired_part.splitlines() if l.lstrip().startswith("pseudo_label"))
    assert "s0: +0.100, s1: +0.100" in line and "[+0.100, +0.100]" in line
    assert line.rstrip().endswith("better") and "2 seeds × 3 test images" in line
    page = render_page(trials, "exp", per_image=per_image)
    (row,) = _rows(page, "paired")
    assert '<td class="better">better</td>' in row and "[+0.100, +0.100]" in row


def test_method_params_whole_or_flattened() -> None:
    assert report.method_params(pd.Series({"params.method.params": '{"b": 1, "a": 2}'})) == '{"a": 2, "b": 1}'
    flat = pd.Series({"params.method.params.threshold": "0.9", "params.method.name": "x",
                      "params.method.params.rampup_steps": np.nan})
    assert json.loads(report.method_params(flat)) == {"threshold": 0.9}


def test_trials_from_runs_keeps_finished_with_test_dice() -> None:
    runs = pd.DataFrame({
        "run_id": ["a", "b", "c"], "status": ["FINISHED", "FAILED", "FINISHED"],
        "params.method.name": ["supervised"] * 3, "params.data.label_fraction": ["0.5"] * 3,
        "params.train.seed": ["0", "1", "2"], "params.method.params": ["{}"] * 3,
        "metrics.test/dice_mean": [0.8, 0.7, np.nan], "metrics.pseudo/dice": [np.nan] * 3,
        "tags.semiseg.config_hash": ["h0", "h1", "h2"],
    })
    trials = report.trials_from_runs(runs)
    assert trials["run_id"].tolist() == ["a"] and trials["dice"].tolist() == [0.8]
    assert "pseudo/dice" in trials and trials["label_fraction"].tolist() == [0.5]
    assert report.trials_from_runs(runs, config_hashes=["h9"]).empty
    assert list(report.trials_from_runs(pd.DataFrame()).columns) == report.BASE


def test_per_class_table(trials: pd.DataFrame) -> None:
    table = report.per_class_table(trials)
    assert len(table) == 3
    assert {"Dice lung", "Dice heart", "HD95 lung", "HD95 heart", "Dice (mean)"} <= set(table.columns)
    row = table[(table["method"] == "supervised") & (table["label fraction"] == "100%")].iloc[0]
    assert row["Dice lung"] == "0.960 ± 0.014"
    assert row["HD95 heart"] == "8.0"  # the NaN of seed 1 is skipped, not averaged as 0
    assert row["seeds"] == 2


def test_full_supervision_level(trials: pd.DataFrame) -> None:
    assert report.full_supervision(trials) == pytest.approx(0.91)
    assert report.full_supervision(trials[trials["method"] != "supervised"]) is None


def test_curves_are_written(tmp_path: Path, trials: pd.DataFrame, history: pd.DataFrame) -> None:
    curves = report.plot_label_efficiency(trials, tmp_path / "curves.png")
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 5000
    pseudo = report.plot_pseudo_quality(history, trials, tmp_path / "pseudo.png")
    assert pseudo is not None and pseudo.stat().st_size > 5000
    assert report.plot_pseudo_quality(history.iloc[:0], trials, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _rows(page: str, table_id: str) -> list[str]:
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', page, re.S).group(0)
    body = re.search(r"<tbody>(.*?)</tbody>", table, re.S).group(1)
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


def test_html_has_a_row_per_method(trials: pd.DataFrame) -> None:
    page = render_page(trials, "exp<1>", "sqlite:///x.db", pseudo_image="pseudo_quality.png")
    rows = _rows(page, "dice-table")
    assert len(rows) == 2 and all(any(m in r for r in rows) for m in ("supervised", "pseudo_label"))
    assert len(_rows(page, "best-configs")) == 3 and len(_rows(page, "per-class")) == 3
    assert "exp&lt;1&gt;" in page and "exp<1>" not in page  # names are escaped
    assert re.findall(r'<img src="([^"]+)"', page) == ["label_efficiency.png", "pseudo_quality.png"]
    assert "http" not in page.replace("sqlite", "")  # nothing fetched from elsewhere


def test_write_dashboard_without_pseudo_metrics(tmp_path: Path, trials: pd.DataFrame,
                                                history: pd.DataFrame) -> None:
    (tmp_path / "pseudo_quality.png").write_bytes(b"stale")
    index = write_dashboard(trials, history.iloc[:0], tmp_path, "exp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "label_efficiency.png"]
    assert "No trial logged pseudo-label metrics" in index.read_text()
