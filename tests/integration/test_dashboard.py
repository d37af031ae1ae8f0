"""A real sweep -> `semiseg report`'s dashboard -> headless Chromium: the page loads its images,
shows a row per method, and a copy sits in the sweep's parent run in MLflow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from semiseg.cli import main
from semiseg.dashboard import build_dashboard
from semiseg.errors import ConfigError

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
METHODS = {"supervised", "pseudo_label"}


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    out = subprocess.run([CHROMIUM, *flags, *args, page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _rows(dom: str, table_id: str) -> list[str]:
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', dom, re.S)
    assert table, f"no table {table_id} in the page"
    return re.findall(r"<tr>(.*?)</tr>", re.search(r"<tbody>(.*?)</tbody>", table.group(0), re.S).group(1), re.S)


def test_dashboard_of_a_real_sweep(finished_sweep, tmp_path: Path, sqlite_uri: str,
                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="no MLflow experiment 'quickstart'"):
        build_dashboard(sqlite_uri, "quickstart", tmp_path / "none")
    outcome = finished_sweep.outcome  # conftest.SHARED_SWEEP: 2 methods x 2 fractions
    out = tmp_path / "reports"

    # The command a user runs; the parent defaults to the latest sweep run.
    assert main(["report", "quickstart", "--uri", outcome.uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test Dice" in printed and f"logged to MLflow run {outcome.parent_run_id}" in printed
    # gallery.png only exists when every shown prediction, recomputed from its trial's logged
    # model, matches the per-image Dice the trial logged (report_gallery.check_logged).
    figures = {"index.html", "label_efficiency.png", "pseudo_quality.png", "gallery.png"}
    assert figures <= {p.name for p in out.iterdir()}
    client = MlflowClient(outcome.uri)
    logged = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "dashboard")}
    assert figures <= logged

    profile = tmp_path / "chromium-profile"
    dom = _chromium(out / "index.html", profile, "--dump-dom").stdout
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert loaded == total >= 3  # curves, gallery, pseudo-label quality
    dice_rows = _rows(dom, "dice-table")
    assert len(dice_rows) == len(METHODS) and all(any(m in r for r in dice_rows) for m in METHODS)
    best_rows = _rows(dom, "best-configs")
    assert {m for m in METHODS if any(f"<td>{m}</td>" in r for r in best_rows)} == METHODS
    assert len(best_rows) == 4 and "threshold" in "".join(best_rows)
    assert len(_rows(dom, "per-class")) == 4
    assert all("[" in r for r in dice_rows)  # every cell carries its bootstrap CI
    planner = _rows(dom, "planner")  # 2 fractions swept: too few budgets for a curve, and says so
    assert len(planner) == 4 and all("n/a: 2 swept budget(s)" in r for r in planner)
    cost = _rows(dom, "cost")  # cost/cpu_s logged by each trial (distributed.cost)
    assert len(cost) == 4 and all(re.search(r"<td>0\.\d{4}</td>", r) for r in cost)
    assert "gallery.png" in dom and "Dice gained per extra compute-hour" in dom

    shot = tmp_path / "dashboard.png"
    _chromium(out / "index.html", profile, f"--screenshot={shot}", "--window-size=1280,2000",
              "--hide-scrollbars")
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/dashboard.png")  # for a person to look at


def test_report_without_finished_trials_is_a_clear_error(tmp_path: Path, sqlite_uri: str) -> None:
    from semiseg import tracking

    tracking.ensure_experiment(sqlite_uri, "empty")
    with pytest.raises(ConfigError, match="no FINISHED trials"):
        build_dashboard(sqlite_uri, "empty", tmp_path / "out")
    assert main(["report", "empty", "--uri", sqlite_uri, "--out", str(tmp_path / "o")]) == 2
