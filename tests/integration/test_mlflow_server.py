"""A sweep against a real shared `mlflow server` on 127.0.0.1 (SQLite backend, local artifact
destination, one worker), checked through the server's REST API, down to what the UI's runs
table shows (Dataset, Source, Model); and a clear, fast error when the server is down.

Its one trial trains on two DDP workers, so the same fit checks DistributedDataParallel (it
was a sweep of its own in test_sweep.py: one TorchTrainer fit, 20-25 s of fixed start-up, fewer)
and that rank 0 alone logs a complete run, model included, to a remote server."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch

from semiseg.distributed.tune import run_sweep
from semiseg.tracking import TrackingUnavailable

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path, start_mlflow_server) -> str:
    return start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts")


def _rest(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _get(url: str, path: str) -> dict:
    return json.load(urllib.request.urlopen(url + path, timeout=10))


def test_ddp_sweep_logs_to_remote_tracking_server(ray_local, mlflow_server: str, tiny_config,
                                                  monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = tiny_config("sweep.label_fractions=[0.5]", "tracking.uri=", "tracking.system_metrics=true",
                      "tracking.log_model=true", "ray.num_workers=2", "sweep.methods=[mean_teacher]",
                      "ray.max_concurrent_trials=1")
    outcome = run_sweep(cfg, "remote")
    assert outcome.uri == mlflow_server
    exp = _get(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart")
    exp_id = exp["experiment"]["experiment_id"]
    exp_tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"  # UI opens on runs
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    by_role = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "semiseg.role"): r for r in runs}
    assert set(by_role) == {"sweep", "trial"}
    trial = by_role["trial"]
    assert trial["info"]["status"] == "FINISHED"
    trial_tags = {t["key"]: t["value"] for t in trial["data"]["tags"]}
    assert trial_tags["ray.world_size"] == "2"  # a trial with two DDP workers
    assert trial_tags["model.wrapper"] == "DistributedDataParallel"
    metrics = {m["key"] for m in trial["data"]["metrics"]}
    assert {"test/dice_mean", "val/dice_mean", "test/dice/heart"} <= metrics
    assert "system/cpu_utilization_percentage" in metrics  # tracking.system_metrics
    arts = _get(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={trial['info']['run_id']}")
    assert "split_manifest.json" in {f["path"] for f in arts["files"]}
    _check_ui_columns(mlflow_server, by_role)


def _check_ui_columns(url: str, by_role: dict) -> None:
    """The runs table's Dataset, Source and Model columns, as the UI reads them over REST."""
    trial, sweep = by_role["trial"], by_role["sweep"]
    tags = {t["key"]: t["value"] for t in trial["data"]["tags"]}
    # Source (and Version): the code that ran, the same on the sweep and its trial.
    sweep_tags = {t["key"]: t["value"] for t in sweep["data"]["tags"]}
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags["semiseg.version"] and sweep_tags["semiseg.heartbeat"]
    for key in ("mlflow.source.name", "mlflow.source.git.commit", "semiseg.version"):
        assert tags.get(key) == sweep_tags.get(key)
    # Dataset: train / val / test inputs with a digest and a source.
    inputs = trial["inputs"]["dataset_inputs"]
    contexts = {i["tags"][0]["value"]: i["dataset"] for i in inputs
                if i["tags"][0]["key"] == "mlflow.data.context"}
    assert set(contexts) == {"train", "val", "test"}
    assert all(d["name"] == "synthetic" and d["digest"] and d["source"] for d in contexts.values())
    # Model: the selected model as a READY LoggedModel of the run, loadable through the server.
    (output,) = trial["outputs"]["model_outputs"]
    model = _get(url, f"/api/2.0/mlflow/logged-models/{output['model_id']}")["model"]
    assert model["info"]["source_run_id"] == trial["info"]["run_id"]
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    loaded = mlflow.pytorch.load_model(f"models:/{output['model_id']}")
    with torch.no_grad():
        assert loaded(torch.rand(3, 1, 32, 32)).shape == (3, 4, 32, 32)
    version = mlflow.register_model(f"models:/{output['model_id']}", "quickstart-unet")
    assert str(version.version) == "1" and version.run_id == trial["info"]["run_id"]


def test_unreachable_server_fails_fast_naming_the_uri(tiny_config) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens here
    start = time.time()
    with pytest.raises(TrackingUnavailable, match=url):
        run_sweep(tiny_config(f"tracking.uri={url}"), "down")
    assert time.time() - start < 30
