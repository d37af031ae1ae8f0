"""The dashboard's sections as HTML strings (semiseg.dashboard assembles them): each a heading,
a note that says how to read it, and its table or figure. Every value is escaped."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from semiseg import paired, report, report_cost, report_planner
from semiseg.report_bands import dice_ci_cells
from semiseg.report_gallery import Gallery

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
td.better, span.better { color: #1a7f37; font-weight: 600; }
td.worse, span.worse { color: #cf222e; font-weight: 600; }
span.noise { color: #59636e; } td.extrapolated { color: #9a6700; }
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
VERDICT_CLASS = {paired.BETTER: "better", paired.WORSE: "worse", paired.NOISE: "noise"}


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(frame: pd.DataFrame, table_id: str) -> str:
    return frame.to_html(index=False, table_id=table_id, border=0, na_rep="-", escape=True)


def _section(title: str, note: str, body: str) -> str:
    return f'<h2>{_e(title)}</h2>\n<p class="note">{_e(note)}</p>\n{body}'


def _figure(name: str, alt: str) -> str:
    return f'<img src="{_e(name)}" alt="{_e(alt)}">'


def _rows_table(table_id: str, header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """A table of (html, css class) cells: for cells that mix text and coloured verdicts."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>"
                                    for v, c in row) + "</tr>\n" for row in rows)
    return (f'<table border="0" class="dataframe" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"\n<tbody>\n{body}</tbody></table>")


def dice_section(bands: pd.DataFrame, comparison: pd.DataFrame) -> str:
    cells = dice_ci_cells(bands, comparison)
    rows = []
    for method, row in cells.iterrows():
        out = [(_e(method), "")]
        for value in row:
            if not isinstance(value, tuple):
                out.append(("-", ""))
                continue
            text, verdict = value
            mark = (f' <span class="{VERDICT_CLASS.get(verdict, "noise")}">{_e(verdict)}</span>'
                    if verdict else "")
            out.append((_e(text) + mark, ""))
        rows.append(out)
    header = ["method", *[f"{report.percent(f)} labels" for f in cells.columns]]
    return _section(
        "Test Dice by label fraction",
        "Mean over foreground classes and over seeds, [bootstrap 95 % CI over seeds × test "
        "images] (n = seeds), of the method.params selected on val; then the paired verdict "
        "against supervised-only at that fraction (better / worse: its CI excludes 0).",
        _rows_table("dice-table", header, rows))


def curves_section(trials: pd.DataFrame, image: str) -> str:
    full = report.full_supervision(trials)
    gap = (f"Dashed line: supervised with every label ({full:.3f}), the level the "
           "semi-supervised methods try to reach with fewer labels." if full is not None
           else "No supervised run at label fraction 1.0, so no full-supervision line.")
    return _section("Label-efficiency curves", "Bands and error bars: the bootstrap 95 % CI "
                    f"of each point (as in the table above). {gap}",
                    _figure(image, "test Dice vs label fraction, with bootstrap 95 % bands"))


def planner_section(plan: pd.DataFrame, image: str | None) -> str:
    rows = []
    for r in plan.itertuples():
        needed = report_planner.format_count(r.labels, r.unit)
        ci = (f"[{report_planner.format_count(r.ci_low, r.unit)}, "
              f"{report_planner.format_count(r.ci_high, r.unit)}]" if np.isfinite(r.ci_low) else "-")
        swept = (f"{report_planner.format_count(r.swept_min, r.unit)}–"
                 f"{report_planner.format_count(r.swept_max, r.unit)}")
        target = (f"{r.target:.0%} of full ({r.target_dice:.3f})" if np.isfinite(r.target_dice)
                  else f"{r.target:.0%} of full")
        status = "extrapolated" if r.status.startswith(("extrapolated", "not reached")) else ""
        rows.append([(_e(r.method), ""), (_e(target), ""), (_e(needed), ""), (_e(ci), ""),
                     (_e(swept), ""), (_e(r.status), status)])
    unit = report_planner.unit_label(plan["unit"].iloc[0]) if len(plan) else "labels"
    header = ["method", "target test Dice", f"{unit} needed", "95% CI", "swept range", "status"]
    figure = _figure(image, "fitted label-efficiency curves and label budgets") if image else ""
    return _section(
        "Label-budget planner: how many labels does each method need?",
        "Per method, Dice(n) = a − b·n^(−c) fitted to its test Dice against the labeled count "
        "over the swept fractions and seeds, solved for the count that reaches 90 % and 95 % of "
        "full supervision (supervised-only with every label); the CI refits each bootstrap "
        "replicate of seeds × test images. A budget outside the swept range is an "
        "extrapolation of the fitted curve, not a measurement.",
        _rows_table("planner", header, rows) + figure)


def gallery_section(gallery: Gallery | None, image: str | None, note: str = "") -> str:
    title = "Gallery: the same test images under every method and label fraction"
    if gallery is None or image is None:
        return _section(title, note or "No gallery: it needs the trials' per-image test metrics "
                        "(test_per_image.json) and their model/ checkpoints (tracking.log_model).",
                        "")
    shown = ", ".join(f"{m} @ {report.percent(f)}: {run[:8]}"
                      for (m, f), run in sorted(gallery.runs.items(), key=lambda kv: kv[0][::-1]))
    return _section(title, "Rows: test images, the ones where the methods differ most first; "
                    "columns: image, ground truth, then each setting's prediction with its "
                    f"Dice on that image, recomputed from its selected model. Runs: {shown}.",
                    _figure(image, "gallery of test images, truth and predictions"))


def paired_section(comparison: pd.DataFrame) -> str:
    table = report.paired_table(comparison)
    if table.empty:
        body = ('<p class="note">No method to compare: supervised-only and another method are '
                "needed at the same label fraction.</p>")
    else:
        body = _table(table, "paired")
        for verdict in ("better", "worse"):  # colour the verdict cells
            body = body.replace(f"<td>{verdict}</td>", f'<td class="{verdict}">{verdict}</td>')
    return _section(
        "Paired comparison with supervised-only",
        "Δ = method − supervised test Dice on the same split and seed; mean Δ over seeds, and a "
        "bootstrap 95 % CI that resamples seeds, then the test images of each (the same images "
        "for both). Verdict: better or worse when the CI excludes 0, else within noise.", body)


def cost_section(cost: pd.DataFrame) -> str:
    return _section(
        "Cost: Dice gained per extra compute-hour",
        "Per trial, the CPU- and GPU-hours Ray reserved for it (wall time × its workers' "
        "CPUs/GPUs), mean over seeds; the paired Δ test Dice against supervised-only divided by "
        "the extra hours over supervised (GPU-hours where a GPU was used).",
        _table(report_cost.display_table(cost), "cost"))


def best_section(trials: pd.DataFrame) -> str:
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
    return _section("Config selected on val per method and label fraction",
                    "The method.params with the highest val Dice averaged over seeds (never "
                    "chosen on test); every other table and figure shows this config.",
                    _table(frame, "best-configs"))


def per_class_section(trials: pd.DataFrame) -> str:
    return _section("Per-class test Dice and HD95",
                    "HD95 in pixels (lower is better); mean ± std over seeds.",
                    _table(report.per_class_table(trials), "per-class"))


def pseudo_section(image: str | None) -> str:
    body = (_figure(image, "pseudo-label quality over epochs") if image else
            '<p class="note">No trial logged pseudo-label metrics (pseudo/dice, '
            "pseudo/coverage): only methods that make pseudo-labels do.</p>")
    return _section("Pseudo-label quality",
                    "Pseudo-labels scored against the unlabeled images' hidden masks on the "
                    "pixels the method used, and the fraction of pixels it used; mean over "
                    "seeds.", body)
