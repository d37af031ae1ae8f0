"""MLflow, and the only module that imports it. Runs are addressed by id through MlflowClient,
never through mlflow's global "active run", so a Ray worker can log to a run its driver made.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from semiseg.errors import ConfigError, SemisegError


class TrackingUnavailable(SemisegError):
    """The tracking server cannot be reached."""


CONFIG_HASH_TAG = "semiseg.config_hash"
ROLE_TAG = "semiseg.role"  # "sweep" for a parent run, "trial" for a child run
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests child runs under a parent


def resolve_uri(configured: str = "") -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an absolute sqlite file under ./mlruns.

    An absolute path matters: Ray workers run in other directories, and a relative URI would
    scatter runs into Ray's temp dirs."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        root = Path("mlruns").resolve()
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if uri.startswith(("http://", "https://", "sqlite:////", "postgresql", "mysql", "databricks")):
        return uri
    raise ConfigError(
        f"tracking URI {uri!r} is not supported: use sqlite:////abs/path.db or "
        "http://host:port (MLflow refuses plain file stores)"
    )


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer (MLflow's own client
    would retry for minutes first)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it, or set "
            "tracking.uri / MLFLOW_TRACKING_URI to a reachable server"
        ) from None


def _artifact_location(uri: str) -> str | None:
    """Next to a local sqlite store, as an absolute path; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it (in the driver) with an absolute artifact location."""
    check_reachable(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


def start_run(uri: str, experiment_id: str, name: str, role: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    all_tags = {ROLE_TAG: role, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return MlflowClient(uri).create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


class RunLogger:
    """Logs to one existing run by id."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not math.isnan(float(v))]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start:start + 500])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_files(self, directory: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """status is FINISHED, FAILED or KILLED: a run never stays RUNNING after its work."""
        self.client.set_terminated(self.run_id, status)


class MlflowCallback:
    """Engine callback (rank 0): epoch metrics, then test metrics and overlays of a trial."""

    def __init__(self, logger: RunLogger) -> None:
        self.logger = logger

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.logger.log_metrics(metrics, step=epoch)

    def on_fit_end(self, result: Any) -> None:
        from semiseg.overlays import write_overlays  # matplotlib only when a run finishes

        self.logger.log_metrics({**result.test_metrics, "best_epoch": result.best_epoch,
                                 "best_val_dice": result.best_val_dice})
        with tempfile.TemporaryDirectory() as tmp:
            if write_overlays(result.examples, Path(tmp)):
                self.logger.log_files(Path(tmp), "overlays")


def finished_hashes(uri: str, experiment_id: str) -> set[str]:
    """Config hashes of the experiment's trials that FINISHED: a rerun skips these."""
    query = f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'FINISHED'"
    runs = MlflowClient(uri).search_runs([experiment_id], query, max_results=50000)
    return {r.data.tags[CONFIG_HASH_TAG] for r in runs if CONFIG_HASH_TAG in r.data.tags}


def close_open_children(uri: str, experiment_id: str, parent_run_id: str, status: str) -> int:
    """End every child run of a sweep still marked RUNNING; returns how many were closed."""
    client = MlflowClient(uri)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    runs = client.search_runs([experiment_id], query, max_results=10000)
    for run in runs:
        client.set_tag(run.info.run_id, "semiseg.closed_by", "sweep driver")
        client.set_terminated(run.info.run_id, status)
    return len(runs)


def search_runs(uri: str, experiment: str, role: str = "trial",
                parent_run_id: str | None = None) -> pd.DataFrame:
    """Runs of an experiment as a DataFrame (columns params.*, metrics.*, tags.*, status)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}")
    query = f"tags.`{ROLE_TAG}` = '{role}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    rows = []
    for run in client.search_runs([exp.experiment_id], query, max_results=10000):
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
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=10000,
                              order_by=["attributes.start_time DESC"])
    rows = [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
             "start_time": r.info.start_time} for r in runs]
    return pd.DataFrame(rows, columns=["run_id", "run_name", "status", "start_time"])
