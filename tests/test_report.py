"""report.py and dashboard.py on hand-built DataFrames: no MLflow, no Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semiseg import report
from semiseg.dashboard import analyse, render_page, write_dashboard


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
    best_rows = _rows(_page(trials), "best-configs")
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
    page = _page(trials, per_image=per_image)
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


def _page(trials: pd.DataFrame, title: str = "exp", source: str = "", figures: set[str] = frozenset(),
          per_image: pd.DataFrame | None = None) -> str:
    return render_page(analyse(trials, per_image), title, source, figures)


def _rows(page: str, table_id: str) -> list[str]:
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', page, re.S).group(0)
    body = re.search(r"<tbody>(.*?)</tbody>", table, re.S).group(1)
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


def test_html_has_a_row_per_method(trials: pd.DataFrame) -> None:
    page = _page(trials, "exp<1>", "sqlite:///x.db", figures={"pseudo_quality.png"})
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


# ---- uncertainty, cost, gallery, every section (issue 15) --------------------------------
from semiseg import report_bands, report_cost  # noqa: E402
from semiseg.report_gallery import Gallery, check_logged, gallery_trials, pick_images, section_config  # noqa: E402


def _images(trials: pd.DataFrame, values: dict[str, list[float]]) -> pd.DataFrame:
    """Per-image rows: each trial's method gets `values[method]` (one per image)."""
    return pd.DataFrame([{"run_id": r, "id": f"i{i}", "dice_mean": v}
                         for r, m in zip(trials["run_id"], trials["method"])
                         for i, v in enumerate(values[m])])


def test_bands_are_centred_on_the_plotted_mean_and_share_their_draws() -> None:
    """One seed, per-image Dice 0.5 / 0.7 (mean 0.6) but test Dice 0.65 (classes weigh
    differently): the band is the images' bootstrap spread around 0.65. A second setting with
    every image +0.1 is resampled with the same draws: its replicates are exactly +0.1."""
    trials = pd.DataFrame([_trial("supervised", 0.1, 0, 0.65), _trial("pseudo_label", 0.1, 0, 0.75)])
    per_image = _images(trials, {"supervised": [0.5, 0.7], "pseudo_label": [0.6, 0.8]})
    bands = report_bands.curve_bands(trials, per_image).set_index("method")
    sup = bands.loc["supervised"]
    assert sup["ci_low"] == pytest.approx(0.55) and sup["ci_high"] == pytest.approx(0.75)
    assert sup["resampled"] == "1 seed × 2 test images"
    draws = report_bands.resample_all(trials, per_image)
    diff = draws[("pseudo_label", 0.1)].replicates - draws[("supervised", 0.1)].replicates
    assert np.allclose(diff, 0.1)
    no_images = report_bands.curve_bands(trials).set_index("method")
    assert np.isnan(no_images.loc["supervised", "ci_low"])
    assert "no CI" in no_images.loc["supervised", "resampled"]


def test_dice_table_shows_ci_and_paired_verdict(trials: pd.DataFrame) -> None:
    chosen = paired_select(trials)
    per_image = pd.DataFrame([{"run_id": r, "id": f"i{i}", "dice_mean": d + 0.01 * i}
                              for r, d in zip(chosen["run_id"], chosen["dice"]) for i in range(3)])
    rows = _rows(_page(trials, per_image=per_image), "dice-table")
    pseudo = next(r for r in rows if "pseudo_label" in r)
    assert '<span class="better">better</span>' in pseudo and "(n=2)" in pseudo
    assert re.search(r"0\.710 \[0\.\d{3}, 0\.\d{3}\]", pseudo)
    supervised = next(r for r in rows if "supervised" in r)
    assert "span" not in supervised  # the baseline has no verdict against itself


def test_cost_is_dice_per_extra_compute_hour(trials: pd.DataFrame) -> None:
    """pseudo_label reserves 2 CPU-h per trial, supervised 1: its +0.10 Dice cost 1 extra CPU-h."""
    trials = trials.assign(**{"cost/cpu_s": np.where(trials["method"] == "supervised", 3600.0, 7200.0),
                              "cost/gpu_s": 0.0})
    chosen = paired_select(trials)
    table = report_cost.cost_table(chosen, report.comparisons(trials)).set_index("method")
    row = table.loc["pseudo_label"]
    assert row["unit"] == "CPU-h" and row["extra_h"] == pytest.approx(1.0)
    assert row["per_hour"] == pytest.approx(0.10) and row["cpu_h"] == pytest.approx(2.0)
    assert table.loc["supervised"].iloc[0]["note"] == "the baseline"
    cheaper = report_cost.cost_table(chosen.assign(**{"cost/cpu_s": 3600.0}), report.comparisons(trials))
    assert cheaper.set_index("method").loc["pseudo_label", "note"].startswith("no extra compute")
    old = report_cost.cost_table(paired_select(trials.drop(columns=["cost/cpu_s", "cost/gpu_s"])),
                                 report.comparisons(trials))
    assert old.set_index("method").loc["pseudo_label", "note"].startswith("no cost logged")
    shown = report_cost.display_table(table.reset_index())
    assert "+0.100 [+0.100, +0.100]" in shown["Δ Dice per extra compute-hour [95% CI]"].tolist()


def test_trial_cost_counts_reserved_resource_seconds() -> None:
    from semiseg.config import load_config
    from semiseg.distributed.cost import TrialCost

    now = [0.0]
    cfg = load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=1.5", "ray.use_gpu=true",
                             "ray.gpus_per_worker=0.5"])
    cost = TrialCost(cfg, clock=lambda: now[0])

    def train(c, run_id, name):  # a TorchTrainer.fit() that takes 100 s
        now[0] += 100.0
        return "result"

    assert cost.timed(train)(cfg, None, "t") == "result"
    now[0] += 20.0  # e.g. copying checkpoints: no Train workers held
    m = cost.metrics()
    assert m == {"cost/wall_s": 120.0, "cost/train_s": 100.0, "cost/cpu_s": 300.0, "cost/gpu_s": 100.0}


def test_gallery_picks_where_methods_differ_most(trials: pd.DataFrame) -> None:
    from semiseg.errors import SemisegError

    chosen = paired_select(trials)
    values = {"supervised": [0.8, 0.2, 0.5, 0.6], "pseudo_label": [0.8, 0.9, 0.55, 0.6]}
    picks = pick_images(chosen, _images(chosen, values), differ=2, typical=1)
    assert [i for i, _ in picks] == ["i1", "i2", "i3"]
    assert picks[0][1] == "methods differ most: Dice spread 0.70 at 10% labels"
    assert picks[2][1].startswith("typical")
    shown = gallery_trials(chosen)
    assert len(shown) == 3 and set(shown["seed"]) == {0}
    assert pick_images(chosen, pd.DataFrame(columns=["run_id", "id"])) == []
    per_image = _images(chosen, values)
    run = chosen.loc[chosen["method"] == "supervised", "run_id"].iloc[0]
    check_logged(np.array([0.81, 0.2]), per_image, run, ["i0", "i1"])  # within bf16 noise
    with pytest.raises(SemisegError, match="differs from the logged one by 0.150"):
        check_logged(np.array([0.5, 0.2]), per_image, run, ["i0", "i1"])


def test_section_config_rebuilds_typed_fields() -> None:
    from semiseg.config import DataConfig, ModelConfig
    from semiseg.errors import SemisegError

    data = section_config({"data.name": "synthetic", "data.image_size": "32", "data.val_fraction": "0.2",
                           "model.depth": "2"}, "data", DataConfig)
    assert (data.name, data.image_size, data.val_fraction) == ("synthetic", 32, 0.2)
    assert section_config({"model.depth": "2"}, "model", ModelConfig).depth == 2
    with pytest.raises(SemisegError, match="data.image_size='big': expected a int"):
        section_config({"data.image_size": "big"}, "data", DataConfig)


def test_dashboard_has_every_section(tmp_path: Path) -> None:
    """Three fractions (so the planner fits), per-image metrics, costs and a gallery: every
    figure is written and linked, every table has its rows."""
    rows = [_trial(m, f, s, d - 0.15 * (1 - f) ** 2 + 0.01 * s)
            for m, d in (("supervised", 0.85), ("pseudo_label", 0.88))
            for f in (0.1, 0.4, 1.0) for s in (0, 1)]
    trials = pd.DataFrame(rows).assign(**{"cost/cpu_s": 600.0, "cost/gpu_s": 0.0})
    per_image = _images(trials, {"supervised": [0.0, 0.1], "pseudo_label": [0.0, 0.1]})
    per_image["dice_mean"] += per_image["run_id"].map(dict(zip(trials["run_id"], trials["dice"])))
    summaries = {r: {"labeled": {"images": int(f * 100), "groups": 1}, "labeling": {"unit": "image"}}
                 for r, f in zip(trials["run_id"], trials["label_fraction"])}
    mask = np.zeros((2, 16, 16), np.int64)
    mask[:, 4:10, 4:10] = 1
    keys = [("supervised", 0.1), ("pseudo_label", 0.1)]
    gallery = Gallery(["i0", "i1"], ["methods differ most", "typical"], np.random.rand(2, 16, 16),
                      mask, {k: mask for k in keys}, {k: np.array([1.0, 1.0]) for k in keys},
                      {k: "0123456789" for k in keys})
    index = write_dashboard(trials, pd.DataFrame(columns=["run_id", "key", "step", "value"]),
                            tmp_path, "exp", per_image=per_image, summaries=summaries,
                            gallery=gallery)
    page = index.read_text()
    assert re.findall(r'<img src="([^"]+)"', page) == ["label_efficiency.png", "planner.png", "gallery.png"]
    assert all((tmp_path / name).stat().st_size > 5000 for name in ("planner.png", "gallery.png"))
    planner = _rows(page, "planner")
    assert len(planner) == 4 and all("labeled images" not in r for r in planner)
    assert "labeled images needed" in page
    assert len(_rows(page, "cost")) == 6 and len(_rows(page, "dice-table")) == 2
    assert "supervised @ 10%: 01234567" in page
