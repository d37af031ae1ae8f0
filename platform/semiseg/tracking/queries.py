"""Reading runs back, for the report, the dashboard and `semiseg pseudolabel`: runs as
DataFrames, metric histories, per-image test metrics, a trial's checkpoint, and the address of
an experiment's runs table in the MLflow UI. Nothing here writes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from semiseg.errors import ConfigError, SemisegError
from semiseg.tracking.runs import PARENT_TAG, PER_IMAGE_ARTIFACT, ROLE_TAG


def _experiment_id(client: MlflowClient, uri: str, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}")
    return exp.experiment_id


def search_runs(uri: str, experiment: str, role: str = "trial",
                parent_run_id: str | None = None) -> pd.DataFrame:
    """Runs of an experiment as a DataFrame (columns params.*, metrics.*, tags.*, status)."""
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, uri, experiment)
    query = f"tags.`{ROLE_TAG}` = '{role}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    rows = []
    for run in client.search_runs([experiment_id], query, max_results=10000):
        row = {"run_id": run.info.run_id, "status": run.info.status, "run_name": run.info.run_name}
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def metric_histories(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Every logged step of the given metrics (e.g. per-epoch pseudo/dice) of the given runs,
    as rows (run_id, key, step, value); search_runs only holds each metric's last value."""
    client = MlflowClient(uri)
    rows = [{"run_id": run_id, "key": key, "step": m.step, "value": m.value}
            for run_id in run_ids for key in keys for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def parent_runs(uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's sweep (parent) runs, latest first: run_id, run_name, status, start_time."""
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, uri, experiment)
    runs = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=10000,
                              order_by=["attributes.start_time DESC"])
    rows = [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
             "start_time": r.info.start_time} for r in runs]
    return pd.DataFrame(rows, columns=["run_id", "run_name", "status", "start_time"])


def per_image_metrics(uri: str, run_ids: list[str]) -> pd.DataFrame:
    """Each test image's metrics of the given runs (the test_per_image.json artifact that
    MlflowCallback logs), as rows: run_id, id, then one column per metric key; null metrics
    are NaN. Runs without the artifact (older, failed or unfinished trials) are absent."""
    client = MlflowClient(uri)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="semiseg-per-image-") as tmp:
        for run_id in run_ids:
            if PER_IMAGE_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
                continue
            folder = Path(tmp) / run_id
            folder.mkdir()
            path = client.download_artifacts(run_id, PER_IMAGE_ARTIFACT, str(folder))
            rows += [{"run_id": run_id, **row} for row in json.loads(Path(path).read_text())]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["run_id", "id"])
    metric_keys = [c for c in frame.columns if c not in ("run_id", "id")]
    return frame[["run_id", "id", *metric_keys]].astype({k: float for k in metric_keys})


def json_artifacts(uri: str, run_ids: list[str], artifact: str) -> dict[str, Any]:
    """A top-level JSON artifact (e.g. split_summary.json) of each given run, parsed:
    {run_id: value}; runs without it are absent."""
    client = MlflowClient(uri)
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="semiseg-json-") as tmp:
        for run_id in run_ids:
            if artifact not in {a.path for a in client.list_artifacts(run_id)}:
                continue
            folder = Path(tmp) / run_id
            folder.mkdir()
            found[run_id] = json.loads(Path(client.download_artifacts(run_id, artifact,
                                                                      str(folder))).read_text())
    return found


def download_checkpoint(uri: str, run_id: str) -> Path:
    """The checkpoint.pt a trial logged under model/, downloaded to a temp folder."""
    import mlflow.artifacts

    target = Path(tempfile.mkdtemp(prefix="semiseg-model-"))
    try:
        folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model",
                                                     tracking_uri=uri, dst_path=str(target))
    except MlflowException as exc:
        raise SemisegError(f"MLflow run {run_id} at {uri} has no model/ artifact to use as a "
                           f"checkpoint: {exc.message.splitlines()[0][:200]}") from None
    checkpoint = Path(folder) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise SemisegError(f"MLflow run {run_id} logged model/ without a checkpoint.pt")
    return checkpoint


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def runs_page(uri: str, experiment: str, flat: bool = False) -> str:
    """The MLflow UI page of the experiment's runs table: on the tracking server itself for an
    http URI, else on `mlflow ui --backend-store-uri URI` at its default address.

    `workflowType=machine_learning` is what opens it on the runs: MLflow 3.17's UI shows an
    experiment by the browser's GenAI / Model training switch (GenAI on a first visit) and not
    by the experiment's kind tag, which ensure_experiment sets all the same. flat: one row per
    run, sorted by name (MLflow nests trials under their sweep unless the table is sorted by
    something else than the start time)."""
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, uri, experiment)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    query = "workflowType=machine_learning"
    if flat:
        query += "&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"  # the Run Name column
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"
