"""Faults during a tracked trial on a real local Ray: a Train worker killed mid-trial, and
the MLflow tracking server killed mid-run (and restarted, or still down at the end). Each run
must end with every epoch's metrics exactly once, or with a spool that names what is missing
(and that the next sweep uploads)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from semiseg import tracking
from semiseg.config import Config
from semiseg.distributed.train import run_tracked_trial

pytestmark = pytest.mark.integration
EPOCHS = 4
EPOCH_KEYS = ("epoch", "val/dice_mean", "train/loss")


def _last_epoch_logged(db: Path) -> int:
    """Highest 'epoch' step in an MLflow SQLite store, read directly (cheap enough to poll)."""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            row = con.execute("SELECT max(step) FROM metrics WHERE key = 'epoch'").fetchone()
    except sqlite3.OperationalError:  # the store is not created yet
        return -1
    return -1 if row[0] is None else int(row[0])


def _in_background(fn: Callable[[threading.Event], None]) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=fn, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def _run_trial(cfg: Config, name: str) -> tuple[MlflowClient, str]:
    """One tracked trial under a parent run, as a sweep's Tune trial runs it (without Tune,
    whose extra actor would only add seconds here); returns the parent's id."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = tracking.start_run(uri, experiment_id, name, "sweep")
    cfg.ray.storage_path = str(Path(cfg.ray.storage_path).resolve())
    run_tracked_trial(cfg, uri, experiment_id, parent)
    return MlflowClient(uri), parent


def _only_child(client: MlflowClient, parent: str) -> Run:
    exp = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent}'")
    return run


def _assert_each_epoch_once(client: MlflowClient, run_id: str) -> None:
    for key in EPOCH_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(EPOCHS)), f"{key}: steps {steps}"
    assert len(client.get_metric_history(run_id, "test/dice_mean")) == 1


# ---- a Train worker killed mid-trial -----------------------------------------------------

def _train_worker_pids() -> list[int]:
    import ray._private.state  # the state API proper needs the dashboard, which is off

    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"].endswith("RayTrainWorker") and a["State"] == "ALIVE"]


def test_killed_worker_resumes_into_the_same_run(ray_local, tmp_path: Path, tiny_config) -> None:
    cfg = tiny_config("ray.max_failures=1", f"train.epochs={EPOCHS}")
    killed: list[int] = []

    def kill_after_first_checkpoint(stop: threading.Event) -> None:
        # Ray's controller lists the checkpoints it took over in this snapshot (it polls every
        # ~2 s); a worker killed before it exists would restart from scratch instead.
        snapshots = tmp_path / "ray"
        while not stop.is_set() and not killed:
            pids = _train_worker_pids() if any(snapshots.glob("*/checkpoint_manager_snapshot.json")) else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    thread, stop = _in_background(kill_after_first_checkpoint)
    try:
        client, parent = _run_trial(cfg, "ft-worker")
    finally:
        stop.set()
        thread.join()
    assert killed, "the worker finished before it could be killed"
    run = _only_child(client, parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["semiseg.resumed_from"].startswith("checkpoint")  # not from scratch
    _assert_each_epoch_once(client, run.info.run_id)


# ---- the MLflow server lost mid-run --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can kill and restart on the same port
    and store. It leaves children behind, so it runs in its own process group."""

    def __init__(self, root: Path) -> None:
        self.db, self.root, self.port = root / "server.db", root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.time() + 120
        while not self._healthy():
            assert self.proc.poll() is None, "mlflow server exited at start"
            assert time.time() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/health", timeout=2).close()
            return True
        except OSError:
            return False

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module's tests (each start costs seconds); each test finds it up."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.kill()


def _spooled(storage: Path, who: str = "rank0") -> list[dict]:
    return [r for path in storage.glob(f"*/mlflow_spool.{who}.jsonl") for r in tracking.Spool(path).records()]


def test_server_lost_mid_run_then_back(ray_local, tmp_path: Path, tiny_config, mlflow_server) -> None:
    """Killed after epoch 0, restarted once the worker has spooled something: the run ends
    with every epoch, uploaded from the spool, and no spool left."""
    mlflow_server.ensure_up()
    cfg = tiny_config(f"train.epochs={EPOCHS}", f"tracking.uri={mlflow_server.url}")
    spooled: list[dict] = []

    def kill_then_restart(stop: threading.Event) -> None:
        while not stop.is_set() and _last_epoch_logged(mlflow_server.db) < 0:
            time.sleep(0.05)
        mlflow_server.kill()
        while not stop.is_set() and not spooled:
            spooled.extend(_spooled(tmp_path / "ray"))
            time.sleep(0.1)
        mlflow_server.start()

    thread, stop = _in_background(kill_then_restart)
    try:
        client, parent = _run_trial(cfg, "ft-server")
    finally:
        stop.set()
        thread.join()
    assert spooled and spooled[0]["op"] == "metrics", "nothing was lost while the server was down"
    run = _only_child(client, parent)
    assert run.info.status == "FINISHED"
    _assert_each_epoch_once(client, run.info.run_id)
    assert _spooled(tmp_path / "ray") == []  # all uploaded
    assert any((tmp_path / "ray").glob("*/checkpoint_*")), "Ray kept no checkpoint"


def test_server_still_down_at_run_end(tmp_path: Path, mlflow_server, monkeypatch) -> None:
    """Nothing may vanish silently: the run warns naming each unsent record, the spool lists
    exactly them, and the next sweep's flush (server back) uploads them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once: no server
    mlflow_server.ensure_up()
    exp = tracking.ensure_experiment(mlflow_server.url, "down")
    run_id = tracking.start_run(mlflow_server.url, exp, "r", "trial")
    storage = str(tmp_path / "ray")
    logger = tracking.RunLogger(mlflow_server.url, run_id, tracking.spool_path(storage, "r", "rank0"))
    logger.log_metrics({"val/dice_mean": 0.5}, step=0)
    mlflow_server.kill()
    with pytest.warns(tracking.TrackingWarning) as caught:
        logger.log_metrics({"val/dice_mean": 0.6}, step=1)
        logger.log_metrics({"val/dice_mean": 0.7}, step=2)
        left = logger.end("FINISHED", wait_s=0)
    assert left == ["metrics step 1: val/dice_mean", "metrics step 2: val/dice_mean",
                    "run status FINISHED"]
    assert any("NOT logged" in str(w.message) and str(logger.spool.path) in str(w.message) for w in caught)
    assert [r["op"] for r in _spooled(tmp_path / "ray")] == ["metrics", "metrics", "end"]

    mlflow_server.start()
    assert tracking.flush_spools(storage) == []
    client = MlflowClient(mlflow_server.url)
    assert [m.value for m in client.get_metric_history(run_id, "val/dice_mean")] == [0.5, 0.6, 0.7]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _spooled(tmp_path / "ray") == []
