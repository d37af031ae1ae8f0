"""A sweep against a real shared `mlflow server` on 127.0.0.1 (SQLite backend, local artifact
destination, one worker), checked through the server's REST API; and a clear, fast error when
the server is down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from semiseg.distributed.tune import run_sweep
from semiseg.tracking import TrackingUnavailable

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited at start"
                assert time.time() < deadline, "mlflow server did not come up in 120 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server leaves children: end the group
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _rest(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def test_sweep_logs_to_remote_tracking_server(ray_local, mlflow_server: str, tiny_config,
                                              monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = tiny_config("sweep.label_fractions=[0.5]", "tracking.uri=")
    outcome = run_sweep(cfg, "remote")
    assert outcome.uri == mlflow_server
    exp = json.load(urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart", timeout=10))
    exp_id = exp["experiment"]["experiment_id"]
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    by_role = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "semiseg.role"): r for r in runs}
    assert set(by_role) == {"sweep", "trial"}
    trial = by_role["trial"]
    assert trial["info"]["status"] == "FINISHED"
    metrics = {m["key"] for m in trial["data"]["metrics"]}
    assert {"test/dice_mean", "val/dice_mean", "test/dice/heart"} <= metrics
    arts = json.load(urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/artifacts/list?run_id={trial['info']['run_id']}", timeout=10))
    assert "split_manifest.json" in {f["path"] for f in arts["files"]}


def test_unreachable_server_fails_fast_naming_the_uri(tiny_config) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens here
    start = time.time()
    with pytest.raises(TrackingUnavailable, match=url):
        run_sweep(tiny_config(f"tracking.uri={url}"), "down")
    assert time.time() - start < 30
