"""The MLflow UI a user opens on semiseg's runs: a real `mlflow server` on 127.0.0.1 over a
SQLite store holding a sweep and its trials (made through semiseg.tracking, as a sweep makes
them: source tags, dataset inputs, the selected model), loaded in headless Chromium at the page
`semiseg sweep` prints. It must be the runs table of the experiment (not MLflow 3's GenAI
overview), and its Dataset, Source and Models columns must be filled."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking
from semiseg.models import create_model

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
EXPERIMENT = "ui-check"
TRIALS = ("supervised-f0.25-s0", "supervised-f1-s0")


def _make_sweep(uri: str) -> None:
    """A finished sweep with two trials, logged the way a real sweep logs them."""
    exp_id = tracking.ensure_experiment(uri, EXPERIMENT)
    sweep = tracking.start_run(uri, exp_id, "nightly", "sweep")
    model = create_model("unet", 1, 4, 4, 2).eval()
    images = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    for name, fraction in zip(TRIALS, (0.25, 1.0)):
        run_id = tracking.start_run(uri, exp_id, name, "trial", {"method": "supervised"}, sweep)
        logger = tracking.RunLogger(uri, run_id)
        logger.log_metrics({"test/dice_mean": 0.6 + fraction / 4}, step=0)
        train = ["labeled"] * int(4 * fraction) + ["unlabeled"] * (4 - int(4 * fraction))
        manifest = [{"index": i, "id": f"img{i}", "group": f"g{i}", "role": r}
                    for i, r in enumerate(train + ["val", "test"])]
        logger.log_dataset("synthetic", "synthetic", {"image_size": 32, "label_fraction": fraction}, manifest)
        logger.log_pytorch_model(model, images)
        logger.end("FINISHED", wait_s=0)
    tracking.RunLogger(uri, sweep).end("FINISHED", wait_s=0)


@pytest.fixture
def ui_server(tmp_path: Path, start_mlflow_server) -> str:
    """`mlflow server` over the store, in its own session; its whole process group is ended."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _make_sweep(store)
    return start_mlflow_server(store)


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
    assert all(f">{name}<" in dom for name in TRIALS)
    # Datasets named with their digests: a train set per trial (other labeled images), and the
    # val and test sets the two trials share.
    assert len(set(re.findall(r"synthetic \(([0-9a-f]{12})\)", dom))) == 4
    models = {m.name for m in client.search_logged_models([experiment.experiment_id])}
    assert models == {"supervised-f0_25-s0", "supervised-f1-s0"}
    assert all(f">{name}<" in dom for name in models)  # the Models column links each one
    source = client.get_run(client.search_runs([experiment.experiment_id])[0].info.run_id)
    assert f">{source.data.tags['mlflow.source.name']}<" in dom  # the Source column

    shot = tmp_path / "mlflow_ui.png"
    _chromium(flat, tmp_path / "profile-b", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    shutil.copy(shot, "/tmp/mlflow_ui.png")  # for a person to look at
