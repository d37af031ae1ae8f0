"""The run logger, for the trial runner and its rank-0 worker: params, tags, metrics and
artifacts of one existing run, addressed by id.

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
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from semiseg.tracking.errors import TrackingWarning, is_transient
from semiseg.tracking.inputs import dataset_records, to_dataset_inputs
from semiseg.tracking.spool import SPOOL_GLOB, Spool, describe, spool_root

SPOOL_WAIT_S = float(os.environ.get("SEMISEG_SPOOL_WAIT_S", "60"))  # end-of-run retries


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
    elif op == "inputs":
        _log_inputs(client, run_id, data)
    elif op == "model":
        from semiseg.tracking.model import upload_model  # torch and mlflow.pytorch: only here

        upload_model(client, run_id, Path(data["dir"]), data["name"])
    elif op == "end":
        client.set_terminated(run_id, data["status"])
    else:
        raise ValueError(f"unknown spool operation {op!r}")


def _log_inputs(client: MlflowClient, run_id: str, data: Any) -> None:
    """`log_inputs`, once more if a concurrent trial inserted the same dataset (one digest per
    experiment) between MLflow's lookup and its insert: the retry finds that row and links it."""
    try:
        client.log_inputs(run_id, datasets=to_dataset_inputs(data))
    except Exception as exc:  # sqlalchemy's IntegrityError, raw or wrapped by MLflow
        if "UNIQUE constraint failed: datasets" not in str(exc):
            raise
        client.log_inputs(run_id, datasets=to_dataset_inputs(data))


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
            if not is_transient(exc):
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
                if is_transient(exc):
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
            if not is_transient(exc):
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

    def log_dataset(self, name: str, source: str, data_config: dict[str, Any],
                    manifest: list[dict[str, Any]]) -> None:
        """The run's dataset inputs, train / val / test (see semiseg.tracking.inputs): what
        `mlflow.log_input` logs, addressed by run id and spooled like the rest."""
        self._do("inputs", dataset_records(name, source, data_config, manifest))

    def log_pytorch_model(self, model: Any, example: Any, name: str = "") -> None:
        """The model as the run's MLflow PyTorch model (semiseg.tracking.model), named `name`
        (default: the run's name, see upload_model). `example`: float32 images (N, C, H, W).
        A model that cannot be exported is named in a TrackingWarning: the trial has trained,
        and its checkpoint.pt is logged all the same."""
        from semiseg.tracking.model import save_pytorch_model

        with tempfile.TemporaryDirectory(prefix="semiseg-model-") as tmp:
            try:
                folder = save_pytorch_model(model, example, Path(tmp) / "model")
            except Exception as exc:  # torch.export refuses some models (data-dependent flow)
                warnings.warn(f"run {self.run_id}: {type(model).__name__} was not logged as an "
                              f"MLflow model: {type(exc).__name__}: {str(exc)[:300]}",
                              TrackingWarning, stacklevel=2)
                return
            self._do("model", {"dir": str(folder), "name": name})  # a spool keeps its own copy

    def start_system_metrics(self, interval_s: float = 10.0) -> Any:
        """MLflow's system-metrics monitor for this run on this machine (semiseg.tracking.model.
        SystemMetrics); .finish() stops it."""
        from semiseg.tracking.model import SystemMetrics

        return SystemMetrics(self.uri, self.run_id, interval_s)

    def end(self, status: str = "FINISHED", wait_s: float = SPOOL_WAIT_S) -> list[str]:
        """status is FINISHED, FAILED or KILLED: a run never stays RUNNING after its work.
        Returns what could not be logged (see close)."""
        self._do("end", {"status": status})
        return self.close(wait_s)


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
