"""Fixtures for integration tests: one real local Ray per session, real MLflow SQLite stores."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]

# Small enough for 2 CPU cores, big enough to exercise every stage of a trial.
TINY = [
    "data.image_size=32", "data.num_images=40", "data.batch_size=4",
    "model.base_channels=4", "model.depth=2",
    "train.epochs=2", "train.steps_per_epoch=3", "tracking.overlays=2",
    "ray.cpus_per_worker=1", "ray.max_failures=0",
    # The selected model's MLflow export (torch.export + save, ~4 s in a fresh worker) only where
    # a test reads it: SHARED_SWEEP, test_mlflow_server, test_ray_job (the nnU-Net sweep), test_sam_chain.
    "tracking.log_model=false",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs and one logical GPU (so fractional-GPU scheduling can be
    exercised on a CPU machine; workers fall back to CPU when CUDA is absent)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
    from semiseg.distributed.cluster import LOCAL_RAY_ENV, _loopback_only, runtime_env

    with _loopback_only():  # like semiseg's own local Ray: listeners on 127.0.0.1 only, and
        # its worker environment (no preemption watcher: one actor process less per fit)
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                 runtime_env=runtime_env(LOCAL_RAY_ENV), configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _free_placement_groups(request):
    """A failed TorchTrainer can leave a placement group holding CPUs; free them after each test
    so one failure cannot hang the tests after it."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in placement_group_table().items():
        if info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head from `ray start --head --block` in its own session, with the dashboard
    on 127.0.0.1 (Ray Jobs need it). It is stopped by its own process group, never by
    `ray stop`, which would end every Ray on the machine."""
    port, dash = free_port(), free_port()
    # The agents' fixed default ports (52365, ...) would clash with any other Ray on the
    # machine (a user's sweep): the head then starts without a job agent.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}"]
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # Ray's socket paths are capped
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # jobs run `semiseg`
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *agent_ports, "--disable-usage-stats", "--block", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_for(lambda: _listening(port) and _listening(dash), head, "ray head")
        yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a graceful `ray start --block` shutdown can take half a minute; nothing to save here
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(ready, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} while starting")
        if time.time() > deadline:
            pytest.fail(f"{what} did not come up in {timeout_s:.0f} s")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def start_mlflow_server():
    """`start(store_uri, artifacts=None) -> url`: a real `mlflow server` on 127.0.0.1 (one
    worker, job execution off), in its own session; its whole process group is ended at
    teardown, since the server leaves child processes behind."""
    servers: list[subprocess.Popen] = []

    def start(store: str, artifacts: Path | None = None) -> str:
        port = free_port()
        extra = ["--artifacts-destination", str(artifacts)] if artifacts else []
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
             *extra, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _healthy(url), server, "mlflow server")
        return url

    yield start
    for server in servers:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def _overrides(root: Path, uri: str, *extra: str) -> list[str]:
    """TINY on the store `uri` and Ray storage under `root`, then `extra`: a command line's overrides."""
    return [*TINY, f"tracking.uri={uri}", f"ray.storage_path={root / 'ray'}", *extra]


def _config_maker(root: Path, uri: str):
    from semiseg.config import load_config

    def make(*extra: str):
        return load_config(QUICKSTART, _overrides(root, uri, *extra))

    return make


@pytest.fixture
def tiny_config(tmp_path: Path, sqlite_uri: str):
    """Builds the quickstart config shrunk to TINY, with extra overrides, in tmp_path."""
    return _config_maker(tmp_path, sqlite_uri)


# The finished sweep that several tests read (test_sweep, test_dashboard, test_mlflow_ui): two
# methods x two label fractions, each trial on 0.5 of the one logical GPU, so two trials share
# it at once; 12 steps an epoch, so they overlap and Dice is above 0 (curves show something).
SHARED_SWEEP = ("sweep.methods=[supervised,pseudo_label]", "sweep.label_fractions=[0.1,1.0]",
                "sweep.params={pseudo_label.threshold: [0.5]}", "model.base_channels=8",
                "train.steps_per_epoch=12", "ray.use_gpu=true", "ray.gpus_per_worker=0.5",
                "ray.cpus_per_worker=0.5", "ray.backend=gloo",
                "tracking.log_model=true")  # test_dashboard's gallery and test_mlflow_ui read the models


@dataclass
class FinishedSweep:
    outcome: Any  # semiseg.distributed.tune.SweepOutcome
    root: Path
    name: str

    config_file: ClassVar[Path] = QUICKSTART

    def overrides(self, *extra: str) -> list[str]:
        """The sweep's overrides of config_file (with extra ones), on its store and Ray storage,
        as a command line gives them."""
        return _overrides(self.root, self.outcome.uri, *SHARED_SWEEP, *extra)

    def config(self, *extra: str):
        """The sweep's config (with extra overrides) on its store and Ray storage."""
        return _config_maker(self.root, self.outcome.uri)(*SHARED_SWEEP, *extra)

    def copy_store(self, to: Path) -> str:
        """A copy of the sweep's store, for a test that adds runs (the others read the original)."""
        to.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root / "mlruns" / "mlflow.db", to / "mlflow.db")
        return f"sqlite:///{to / 'mlflow.db'}"


@pytest.fixture(scope="session")
def finished_sweep(ray_local, tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """One real four-trial sweep, run once per session; tests must not add runs to its store."""
    from semiseg.distributed.tune import run_sweep

    root = tmp_path_factory.mktemp("shared-sweep")
    cfg = _config_maker(root, f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")(*SHARED_SWEEP)
    return FinishedSweep(run_sweep(cfg, "nightly"), root, "nightly")
