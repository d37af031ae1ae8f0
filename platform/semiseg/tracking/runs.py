"""Run lifecycle, for the sweep driver and the trial runner: where runs live (resolve_uri,
check_reachable), experiments, parent and child runs, and what a rerun may skip.

Runs are addressed by id through MlflowClient, never through mlflow's global "active run",
so a Ray worker can log to a run its driver made."""

from __future__ import annotations

import os
import urllib.request
import warnings
from pathlib import Path

from mlflow.tracking import MlflowClient

from semiseg.errors import ConfigError
from semiseg.tracking.errors import TrackingUnavailable, TrackingWarning, is_transient
from semiseg.tracking.source import SOURCE_TAGS, source_tags

CONFIG_HASH_TAG = "semiseg.config_hash"
ROLE_TAG = "semiseg.role"  # "sweep" for a parent run, "trial" for a child run
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests child runs under a parent
PER_IMAGE_ARTIFACT = "test_per_image.json"  # a trial's per-test-image metrics, for bootstrap CIs
PER_CASE_ARTIFACT = "test_per_case.json"  # volume datasets: per test case Dice / HD95 (mm)
CLOSED_BY_TAG = "semiseg.closed_by"  # who ended a run that could not end itself
END_REASON_TAG = "semiseg.end_reason"  # and why
# MLflow 3's experiment kind: model training, not GenAI. The key and value are those the UI's
# experiment-kind selector writes (mlflow/server/js, ExperimentKind). MLflow 3.17's UI itself
# opens an experiment by the browser's GenAI / Model training switch instead (GenAI on a first
# visit), so the links semiseg prints carry workflowType=machine_learning (queries.runs_page).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


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
    """The experiment's id, creating it (in the driver) with an absolute artifact location and
    the model-training kind; an experiment without a kind (an older semiseg made it) gets it,
    one whose kind a user chose keeps theirs."""
    check_reachable(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def start_run(uri: str, experiment_id: str, name: str, role: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """A new RUNNING run tagged with its role, its source (the code that made it; a child copies
    its parent's) and its parent sweep; returns its id."""
    client = MlflowClient(uri)
    if parent_run_id:
        parent_tags = client.get_run(parent_run_id).data.tags
        source = {k: parent_tags[k] for k in SOURCE_TAGS if k in parent_tags} or source_tags()
    else:
        source = source_tags()
    all_tags = {**source, ROLE_TAG: role, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


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
        if not is_transient(exc):
            raise
        warnings.warn(f"MLflow at {uri} is unreachable; child runs of {parent_run_id} that are "
                      "still RUNNING were not closed", TrackingWarning, stacklevel=2)
        return 0
    for run in runs:
        client.set_tag(run.info.run_id, CLOSED_BY_TAG, "sweep driver")
        client.set_tag(run.info.run_id, END_REASON_TAG, "the sweep ended while this trial was "
                       "RUNNING (stopped by its scheduler, or its actor died)")
        client.set_terminated(run.info.run_id, status)
    return len(runs)
