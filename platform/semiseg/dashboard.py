"""An experiment's dashboard: one self-contained folder (index.html + PNGs, no CSS/JS from
anywhere else) built from its MLflow runs, and logged to the sweep's parent run under
`dashboard/` so it is one click away in the MLflow UI. Numbers and figures come from report*.py;
this module only assembles the page (its sections: semiseg.dashboard_sections) and moves it.
Every table and figure shows, per method and label fraction, the method.params selected on val
(report.best_configs says which), with its uncertainty: bootstrap 95 % CIs (report_bands), the
paired verdicts against supervised-only (semiseg.paired), the label budgets with their CIs
(report_planner); plus a gallery of the same test images under every setting (report_gallery)
and the Dice gained per extra compute-hour (report_cost).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from semiseg import paired, report, report_bands, report_cost, report_planner, tracking
from semiseg import dashboard_sections as sections
from semiseg.errors import ConfigError, SemisegError
from semiseg.report_gallery import Gallery, build_gallery, plot_gallery

CURVES, PSEUDO, PLANNER, GALLERY, INDEX = ("label_efficiency.png", "pseudo_quality.png",
                                           "planner.png", "gallery.png", "index.html")
SPLIT_SUMMARY = "split_summary.json"  # a trial's labeled images / cases (distributed.train)


@dataclass
class Analysis:
    """Everything the page shows, computed once from the trials."""

    trials: pd.DataFrame      # every finished trial
    chosen: pd.DataFrame      # those of the method.params selected on val, with count / unit
    comparison: pd.DataFrame  # paired.paired_comparisons
    bands: pd.DataFrame       # report_bands.curve_bands
    plan: pd.DataFrame        # report_planner.plan
    cost: pd.DataFrame        # report_cost.cost_table


def analyse(trials: pd.DataFrame, per_image: pd.DataFrame | None = None,
            summaries: dict[str, dict] | None = None) -> Analysis:
    chosen = report_planner.labeled_counts(paired.select_on_val(trials), summaries or {})
    resampled = report_bands.resample_all(chosen, per_image)
    comparison = report.comparisons(trials, per_image)
    return Analysis(trials, chosen, comparison, report_bands.curve_bands(chosen, per_image),
                    report_planner.plan(chosen, resampled),
                    report_cost.cost_table(chosen, comparison))


@dataclass
class Dashboard:
    index: Path             # the index.html written
    trials: pd.DataFrame    # the finished trials it shows (report.finished_trials)
    logged_to: str | None   # the parent run id whose artifacts/dashboard hold a copy
    per_image: pd.DataFrame  # their per-test-image metrics (empty: CIs over seeds only)
    plan: pd.DataFrame      # the label budgets (report_planner.plan)
    gallery: Gallery | None  # the images and predictions shown (None: no gallery)


def build_dashboard(uri: str, experiment: str, out_dir: Path, parent_run_id: str | None = None,
                    log: bool = True) -> Dashboard:
    """Read the experiment's finished trials (only those of parent_run_id when given), write
    the dashboard into out_dir, and log it to parent_run_id, else to the latest sweep run."""
    trials = report.finished_trials(uri, experiment, parent_run_id)
    if trials.empty:
        scope = f"sweep run {parent_run_id} of experiment" if parent_run_id else "experiment"
        raise ConfigError(f"{scope} {experiment!r} at {uri} has no FINISHED trials with test "
                          "metrics yet: run `semiseg sweep CONFIG` first, or check --parent/--uri")
    history = report.pseudo_histories(uri, trials)
    per_image = report.per_image_results(uri, trials)
    summaries = tracking.json_artifacts(uri, trials["run_id"].tolist(), SPLIT_SUMMARY)
    gallery, note = None, ""
    try:
        gallery = build_gallery(uri, paired.select_on_val(trials), per_image)
    except SemisegError as exc:  # e.g. a dataset folder not on this machine: the rest stands
        note = f"No gallery: {exc}"
    if parent_run_id is None:
        parents = tracking.parent_runs(uri, experiment)
        parent_run_id = parents["run_id"].iloc[0] if len(parents) else None
    source = f"{uri}" + (f", sweep run {parent_run_id}" if parent_run_id else "")
    analysis = analyse(trials, per_image, summaries)
    index = write_dashboard(trials, history, Path(out_dir), experiment, source, per_image,
                            analysis=analysis, gallery=gallery, gallery_note=note)
    if log and parent_run_id:
        tracking.RunLogger(uri, parent_run_id).log_files(index.parent, "dashboard")
    return Dashboard(index, trials, parent_run_id if log else None, per_image, analysis.plan,
                     gallery)


def write_dashboard(trials: pd.DataFrame, history: pd.DataFrame, out_dir: Path, title: str,
                    source: str = "", per_image: pd.DataFrame | None = None,
                    summaries: dict[str, dict] | None = None, gallery: Gallery | None = None,
                    analysis: Analysis | None = None, gallery_note: str = "") -> Path:
    """The page and its figures into out_dir (no MLflow); returns the index.html path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CURVES, PSEUDO, PLANNER, GALLERY, INDEX):  # no stale figure may linger
        (out_dir / name).unlink(missing_ok=True)
    analysis = analysis or analyse(trials, per_image, summaries)
    report.plot_label_efficiency(analysis.chosen, out_dir / CURVES, analysis.bands)
    figures = {
        PSEUDO: report.plot_pseudo_quality(history, analysis.chosen, out_dir / PSEUDO),
        PLANNER: report_planner.plot_planner(analysis.chosen, analysis.plan, out_dir / PLANNER),
        GALLERY: plot_gallery(gallery, out_dir / GALLERY) if gallery else None,
    }
    page = render_page(analysis, title, source, {k for k, v in figures.items() if v}, gallery,
                       gallery_note)
    (out_dir / INDEX).write_text(page, encoding="utf-8")
    return out_dir / INDEX


def render_page(analysis: Analysis, title: str, source: str = "",
                figures: set[str] = frozenset(), gallery: Gallery | None = None,
                gallery_note: str = "") -> str:
    """The whole HTML page; images are relative links to the PNGs named in `figures` (and
    label_efficiency.png) next to it."""
    trials = analysis.chosen
    seeds = sorted(trials["seed"].unique())
    meta = (f"{len(analysis.trials)} finished trials · methods: "
            f"{', '.join(sorted(trials['method'].unique()))} · label fractions: "
            f"{', '.join(map(report.percent, sorted(trials['label_fraction'].unique())))}"
            f" · seeds: {', '.join(map(str, seeds))} · generated {time.strftime('%Y-%m-%d %H:%M')}")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>semiseg · {html.escape(title)}</title><style>{sections.STYLE}</style>",
        f"<script>{sections.IMAGES_SCRIPT}</script></head><body>",
        f"<h1>semiseg · {html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(meta)}<br>source: {html.escape(source)}</p>',
        sections.dice_section(analysis.bands, analysis.comparison),
        sections.curves_section(trials, CURVES),
        sections.planner_section(analysis.plan, PLANNER if PLANNER in figures else None),
        sections.gallery_section(gallery, GALLERY if GALLERY in figures else None, gallery_note),
        sections.paired_section(analysis.comparison),
        sections.cost_section(analysis.cost),
        sections.best_section(analysis.trials),
        sections.per_class_section(trials),
        sections.pseudo_section(PSEUDO if PSEUDO in figures else None),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
