"""MLflow, and the only module that imports it. Runs are addressed by id through MlflowClient,
never through mlflow's global "active run", so a Ray worker can log to a run its driver made.

A RunLogger given a spool file never loses a record to an unreachable server: what cannot be
sent is appended to the spool (JSONL, next to the trial's checkpoints) and replayed, in order,
on the next call that gets through, at the end of the run (with retries), or by `flush_spools`
when the next sweep starts. What is still unsent at the end is named in a TrackingWarning.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from semiseg.errors import ConfigError, SemisegError
from semiseg.spool import SPOOL_GLOB, Spool, describe, spool_path, spool_root  # noqa: F401


class TrackingUnavailable(SemisegError):
    """The tracking server cannot be reached."""


class TrackingWarning(UserWarning):
    """Records could not be sent to MLflow (yet); the message says which and where they wait."""


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


# Errors worth spooling: the server is down, restarting, overloaded or slow. A request the
# server rejects (bad value, unknown run) is a bug and raises as before.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
SPOOL_WAIT_S = float(os.environ.get("SEMISEG_SPOOL_WAIT_S", "60"))  # end-of-run retries


def _transient(exc: Exception) -> bool:
    if isinstance(exc, (OSError, requests.RequestException)):
        return True
    return isinstance(exc, MlflowException) and exc.error_code in _TRANSIENT_CODES


def _short_http_retries() -> None:
    """MLflow retries an unreachable server for minutes (7 retries, doubling backoff) inside
    each call, which would stall training; with a spool, seconds are enough. Settings that
    are already in the environment win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _send(client: MlflowClient, run_id: str, op: str, data: Any) -> None:
    """Performs one spool record's operation."""
    if op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in data.items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in data.items()])
    elif op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, data["time"], data["step"])
                                          for k, v in data["values"].items()])
    elif op == "dict":
        client.log_dict(run_id, data["obj"], data["file"])
    elif op == "files":
        client.log_artifacts(run_id, data["dir"], data["path"])
    elif op == "end":
        client.set_terminated(run_id, data["status"])
    else:
        raise ValueError(f"unknown spool operation {op!r}")


class RunLogger:
    """Logs to one existing run by id; with a spool, an unreachable server delays records
    instead of failing the run (see the module docstring)."""

    def __init__(self, uri: str, run_id: str, spool: Path | None = None) -> None:
        if uri.startswith(("http://", "https://")):
            _short_http_retries()
        self.client = MlflowClient(uri)
        self.uri, self.run_id = uri, run_id
        self.spool = Spool(spool) if spool else None
        self._warned = False

    def _do(self, op: str, data: Any) -> None:
        """Send now, unless older records wait (order matters: 'end' comes last) or the server
        is unreachable; then append to the spool."""
        if self.spool is None:
            _send(self.client, self.run_id, op, data)
            return
        if self.spool.records() and not self.flush():
            self.spool.append({"uri": self.uri, "run_id": self.run_id, "op": op, "data": data})
            return
        try:
            _send(self.client, self.run_id, op, data)
        except Exception as exc:
            if not _transient(exc):
                raise
            self._warn_once(exc)
            self.spool.append({"uri": self.uri, "run_id": self.run_id, "op": op, "data": data})

    def _warn_once(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"MLflow at {self.uri} is unreachable ({str(exc)[:200]}); run "
                          f"{self.run_id} keeps training and spools records to {self.spool.path}",
                          TrackingWarning, stacklevel=3)

    def flush(self) -> bool:
        """Replay spooled records in order, stopping at the first that fails again; True when
        nothing is left."""
        if self.spool is None:
            return True
        records = self.spool.records()
        for i, record in enumerate(records):
            try:
                _send(self.client, record["run_id"], record["op"], record["data"])
            except Exception as exc:
                if _transient(exc):
                    self.spool.keep_only(records[i:])
                    return False
                kept = self.spool.reject(record, str(exc)[:500])
                warnings.warn(f"MLflow refused a spooled record ({describe(record)}: {exc}); "
                              f"it is kept in {kept}", TrackingWarning, stacklevel=2)
        self.spool.keep_only([])
        return True

    def close(self, wait_s: float = SPOOL_WAIT_S) -> list[str]:
        """At the end of a run: retry the spool for up to wait_s seconds. Returns what is still
        unsent, and warns naming it and the file that lists it: never a silent gap."""
        deadline = time.monotonic() + wait_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(2)
        left = [describe(r) for r in self.spool.records()] if self.spool else []
        if left:
            warnings.warn(f"MLflow run {self.run_id} at {self.uri}: {len(left)} records NOT "
                          f"logged ({'; '.join(left)}). They are kept in {self.spool.path}; the "
                          "next `semiseg sweep` with the same ray.storage_path uploads them.",
                          TrackingWarning, stacklevel=2)
        return left

    def logged_steps(self, key: str) -> set[int]:
        """Steps of a metric already logged or spooled: a restarted worker skips these."""
        spooled = {r["data"]["step"] for r in (self.spool.records() if self.spool else [])
                   if r["op"] == "metrics" and key in r["data"]["values"]}
        try:
            return spooled | {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except Exception as exc:
            if not _transient(exc):
                raise
            return spooled

    def log_params(self, params: dict[str, Any]) -> None:
        items = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}
        keys = list(items)
        for start in range(0, len(keys), 100):  # MLflow caps a batch at 100 params
            self._do("params", {k: items[k] for k in keys[start:start + 100]})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._do("tags", {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not math.isnan(float(v))}
        keys = list(values)
        for start in range(0, len(keys), 500):
            self._do("metrics", {"step": step, "time": int(time.time() * 1000),
                                 "values": {k: values[k] for k in keys[start:start + 500]}})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._do("dict", {"obj": obj, "file": artifact_file})

    def log_files(self, directory: Path, artifact_path: str) -> None:
        self._do("files", {"dir": str(directory), "path": artifact_path})

    def end(self, status: str = "FINISHED", wait_s: float = SPOOL_WAIT_S) -> list[str]:
        """status is FINISHED, FAILED or KILLED: a run never stays RUNNING after its work.
        Returns what could not be logged (see close)."""
        self._do("end", {"status": status})
        return self.close(wait_s)


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


def flush_spools(storage: str) -> list[str]:
    """Upload what earlier runs spooled under this storage path (e.g. while the server was
    down); returns one line per spool that still cannot be sent."""
    left = []
    for path in sorted(spool_root(storage).glob(SPOOL_GLOB)):
        records = Spool(path).records()
        if not records:
            continue
        logger = RunLogger(records[0]["uri"], records[0]["run_id"], path)
        if not logger.flush():
            left.append(f"{path}: {len(logger.spool.records())} records for run "
                        f"{logger.run_id} at {logger.uri}")
    return left


class MlflowCallback:
    """Engine callback (rank 0): epoch metrics, then test metrics and overlays of a trial.

    skip_epochs: epochs the run already has (or spools), so a worker restarted from a
    checkpoint older than its last logged epoch logs each epoch once."""

    def __init__(self, logger: RunLogger, skip_epochs: set[int] | None = None) -> None:
        self.logger = logger
        self.skip_epochs = skip_epochs or set()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if epoch not in self.skip_epochs:
            self.logger.log_metrics(metrics, step=epoch)

    def on_fit_end(self, result: Any) -> None:
        from semiseg.overlays import write_overlays  # matplotlib only when a run finishes

        if not self.logger.logged_steps("best_epoch"):  # a restart after the test logged it
            self.logger.log_metrics({**result.test_metrics, "best_epoch": result.best_epoch,
                                     "best_val_dice": result.best_val_dice})
        with tempfile.TemporaryDirectory() as tmp:
            if write_overlays(result.examples, Path(tmp)):
                self.logger.log_files(Path(tmp), "overlays")
        self.logger.close()


def finished_hashes(uri: str, experiment_id: str) -> set[str]:
    """Config hashes of the experiment's trials that FINISHED: a rerun skips these."""
    query = f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'FINISHED'"
    runs = MlflowClient(uri).search_runs([experiment_id], query, max_results=50000)
    return {r.data.tags[CONFIG_HASH_TAG] for r in runs if CONFIG_HASH_TAG in r.data.tags}


def close_open_children(uri: str, experiment_id: str, parent_run_id: str, status: str) -> int:
    """End every child run of a sweep still marked RUNNING; returns how many were closed."""
    client = MlflowClient(uri)
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    try:
        runs = client.search_runs([experiment_id], query, max_results=10000)
    except Exception as exc:  # called in a `finally`: must not hide the sweep's own error
        if not _transient(exc):
            raise
        warnings.warn(f"MLflow at {uri} is unreachable; child runs of {parent_run_id} that are "
                      "still RUNNING were not closed", TrackingWarning, stacklevel=2)
        return 0
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
