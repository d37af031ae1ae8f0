"""An experiment's dashboard: one self-contained folder (index.html + PNGs, no CSS/JS from
anywhere else) built from its MLflow runs, and logged to the sweep's parent run under
`dashboard/` so it is one click away in the MLflow UI. Tables and figures come from report.py;
this module only assembles the page and moves it. Every table and figure shows, per method and
label fraction, the method.params selected on val (report.best_configs says which); the paired
comparisons with supervised-only carry a bootstrap CI and a verdict.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from semiseg import paired, report, tracking
from semiseg.errors import ConfigError

CURVES, PSEUDO, INDEX = "label_efficiency.png", "pseudo_quality.png", "index.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; color: #1f2328; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta, .note { color: #59636e; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d1d9e0; padding: 4px 8px; text-align: right; }
th { background: #f6f8fa; } tbody tr:nth-child(even) { background: #fafbfc; }
td:first-child, th:first-child { text-align: left; }
#best-configs td:nth-child(3), #paired td:nth-child(3) { text-align: left;
  font-family: ui-monospace, monospace; }
td.better { color: #1a7f37; font-weight: 600; } td.worse { color: #cf222e; font-weight: 600; }
img { max-width: 100%; border: 1px solid #d1d9e0; }
"""

# dump-dom cannot see whether an <img> decoded; this leaves the count where tests can read it.
IMAGES_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
});
"""


@dataclass
class Dashboard:
    index: Path             # the index.html written
    trials: pd.DataFrame    # the finished trials it shows (report.finished_trials)
    logged_to: str | None   # the parent run id whose artifacts/dashboard hold a copy
    per_image: pd.DataFrame  # their per-test-image metrics (empty: CIs over seeds only)


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
    if parent_run_id is None:
        parents = tracking.parent_runs(uri, experiment)
        parent_run_id = parents["run_id"].iloc[0] if len(parents) else None
    source = f"{uri}" + (f", sweep run {parent_run_id}" if parent_run_id else "")
    index = write_dashboard(trials, history, Path(out_dir), experiment, source, per_image)
    if log and parent_run_id:
        tracking.RunLogger(uri, parent_run_id).log_files(index.parent, "dashboard")
    return Dashboard(index, trials, parent_run_id if log else None, per_image)


def write_dashboard(trials: pd.DataFrame, history: pd.DataFrame, out_dir: Path, title: str,
                    source: str = "", per_image: pd.DataFrame | None = None) -> Path:
    """The page and its figures into out_dir (no MLflow); returns the index.html path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CURVES, PSEUDO, INDEX):  # a stale figure from an earlier report must not linger
        (out_dir / name).unlink(missing_ok=True)
    chosen = paired.select_on_val(trials)
    report.plot_label_efficiency(chosen, out_dir / CURVES)
    pseudo = report.plot_pseudo_quality(history, chosen, out_dir / PSEUDO)
    page = render_page(trials, title, source, pseudo_image=PSEUDO if pseudo else None,
                       per_image=per_image)
    (out_dir / INDEX).write_text(page, encoding="utf-8")
    return out_dir / INDEX


def _table(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(index=False, table_id=table_id, border=0, na_rep="-", escape=True)


def _best_table(trials: pd.DataFrame) -> str:
    best = report.best_configs(trials)
    frame = pd.DataFrame({
        "method": best["method"],
        "label fraction": best["label_fraction"].map(report.percent),
        "method.params": best["params"].map(lambda p: "defaults" if p in ("{}", "") else p),
        "val Dice (selects)": best["val_mean"].map(lambda v: f"{v:.3f}" if pd.notna(v) else "-"),
        "test Dice": [f"{m:.3f}" + (f" ± {s:.3f}" if n > 1 else "")
                      for m, s, n in zip(best["dice_mean"], best["dice_std"], best["seeds"])],
        "seeds": best["seeds"], "configs compared": best["configs"],
    })
    return _table(frame, "best-configs")


def _paired_table(trials: pd.DataFrame, per_image: pd.DataFrame | None) -> str:
    table = report.paired_table(report.comparisons(trials, per_image))
    if table.empty:
        return '<p class="note">No method to compare: supervised-only and another method are ' \
               "needed at the same label fraction.</p>"
    page = _table(table, "paired")
    for verdict in ("better", "worse"):  # colour the verdict cells
        page = page.replace(f"<td>{verdict}</td>", f'<td class="{verdict}">{verdict}</td>')
    return page


def render_page(trials: pd.DataFrame, title: str, source: str = "",
                pseudo_image: str | None = None, per_image: pd.DataFrame | None = None) -> str:
    """The whole HTML page; images are relative links to PNGs next to it."""
    everything, trials = trials, paired.select_on_val(trials)
    dice = report.dice_table(trials).rename(columns=lambda c: f"{report.percent(float(c))} labels")
    full = report.full_supervision(trials)
    gap = (f"Dashed line: supervised with every label ({full:.3f}), the level the "
           "semi-supervised methods try to reach with fewer labels." if full is not None
           else "No supervised run at label fraction 1.0, so no full-supervision line.")
    seeds = sorted(trials["seed"].unique())
    meta = (f"{len(everything)} finished trials · methods: {', '.join(sorted(trials['method'].unique()))}"
            f" · label fractions: {', '.join(map(report.percent, sorted(trials['label_fraction'].unique())))}"
            f" · seeds: {', '.join(map(str, seeds))} · generated {time.strftime('%Y-%m-%d %H:%M')}")
    pseudo = (f'<img src="{pseudo_image}" alt="pseudo-label quality over epochs">' if pseudo_image
              else '<p class="note">No trial logged pseudo-label metrics (pseudo/dice, '
                   'pseudo/coverage): only methods that make pseudo-labels do.</p>')
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>semiseg · {html.escape(title)}</title><style>{STYLE}</style>",
        f"<script>{IMAGES_SCRIPT}</script></head><body>",
        f"<h1>semiseg · {html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(meta)}<br>source: {html.escape(source)}</p>',
        "<h2>Test Dice by label fraction</h2>",
        '<p class="note">Mean over foreground classes; mean ± std over seeds (n = seeds) of the '
        "method.params selected on val.</p>",
        _table(dice.reset_index(), "dice-table"),
        "<h2>Label-efficiency curves</h2>", f'<p class="note">{html.escape(gap)}</p>',
        f'<img src="{CURVES}" alt="test Dice vs label fraction">',
        "<h2>Paired comparison with supervised-only</h2>",
        '<p class="note">Δ = method − supervised test Dice on the same split and seed; mean Δ '
        "over seeds, and a bootstrap 95 % CI that resamples seeds, then the test images of each "
        "(the same images for both). Verdict: better or worse when the CI excludes 0, else "
        "within noise.</p>",
        _paired_table(everything, per_image),
        "<h2>Config selected on val per method and label fraction</h2>",
        '<p class="note">The method.params with the highest val Dice averaged over seeds '
        "(never chosen on test); every other table and figure shows this config.</p>",
        _best_table(everything),
        "<h2>Per-class test Dice and HD95</h2>",
        '<p class="note">HD95 in pixels (lower is better); mean ± std over seeds.</p>',
        _table(report.per_class_table(trials), "per-class"),
        "<h2>Pseudo-label quality</h2>",
        '<p class="note">Pseudo-labels scored against the unlabeled images\' hidden masks '
        "on the pixels the method used, and the fraction of pixels it used; mean over seeds.</p>",
        pseudo, "</body></html>",
    ]
    return "\n".join(parts) + "\n"
