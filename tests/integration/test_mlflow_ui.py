"""The MLflow UI a user opens on semiseg's runs: a real `mlflow server` on 127.0.0.1 over the
store of a finished real sweep (conftest.finished_sweep: four trials, with their source tags,
dataset inputs and selected models), loaded in headless Chromium at the page `semiseg sweep`
prints. It must be the runs table of the experiment (not MLflow 3's GenAI
overview), and its Dataset, Source and Models columns must be filled."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
EXPERIMENT = "quickstart"  # conftest.SHARED_SWEEP's experiment


@pytest.fixture
def ui_server(finished_sweep, tmp_path: Path, start_mlflow_server) -> str:
    """`mlflow server` over a copy of the session's finished sweep (the server may migrate or
    write to its store), in its own session; its whole process group is ended."""
    return start_mlflow_server(finished_sweep.copy_store(tmp_path / "store"))


def _chromium(url: str, profile: Path, *args: str) -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
             "--window-size=1800,1000", "--hide-scrollbars"]  # wide: the grid draws visible columns only
    out = subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_mlflow_ui_opens_on_the_runs_table_with_dataset_source_and_model(ui_server: str,
                                                                         tmp_path: Path) -> None:
    client = MlflowClient(ui_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    page = tracking.runs_page(ui_server, EXPERIMENT)  # what `semiseg sweep` tells a user to open
    assert page.startswith(f"{ui_server}/#/experiments/{experiment.experiment_id}/runs")

    # A fresh browser profile: a first visit, when MLflow's own default is its GenAI view.
    dom = _chromium(page, tmp_path / "profile-a", "--dump-dom")
    assert "matching runs" in dom and ">nightly<" in dom  # the runs table, with the sweep's row
    assert f"/experiments/{experiment.experiment_id}/overview" not in dom  # no GenAI navigation
    assert "workflowType=genai" not in dom

    # One row per run: each trial with its datasets, its source and its logged model.
    flat = tracking.runs_page(ui_server, EXPERIMENT, flat=True)
    dom = _chromium(flat, tmp_path / "profile-b", "--dump-dom")
    headers = set(re.findall(r'role="columnheader"[^>]*>.*?>([A-Z][A-Za-z ]+)<', dom))
    assert {"Run Name", "Dataset", "Source", "Models"} <= headers, headers
    trials = [r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
    assert len(trials) == 4 and all(f">{r.info.run_name}<" in dom for r in trials)
    # Datasets named with their digests: each trial's train set (its labeled images), and the
    # val and test sets all trials share.
    digests = {i.dataset.digest[:12] for r in trials for i in r.inputs.dataset_inputs}
    assert len(digests) >= 3 and digests == set(re.findall(r"synthetic \(([0-9a-f]{12})\)", dom))
    models = {m.name for m in client.search_logged_models([experiment.experiment_id])}
    assert len(models) == 4 and all(f">{name}<" in dom for name in models)  # the Models column
    source = client.get_run(client.search_runs([experiment.experiment_id])[0].info.run_id)
    assert f">{source.data.tags['mlflow.source.name']}<" in dom  # the Source column

    shot = tmp_path / "mlflow_ui.png"
    _chromium(flat, tmp_path / "profile-b", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/mlflow_ui.png")  # for a person to look at
