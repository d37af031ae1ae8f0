"""Fixtures for integration tests: one real local Ray per session, real MLflow SQLite stores."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Small enough for 2 CPU cores, big enough to exercise every stage of a trial.
TINY = [
    "data.image_size=32", "data.num_images=40", "data.batch_size=4",
    "model.base_channels=4", "model.depth=2",
    "train.epochs=2", "train.steps_per_epoch=3", "tracking.overlays=2",
    "ray.cpus_per_worker=1", "ray.max_failures=0",
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
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
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


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tmp_path: Path, sqlite_uri: str):
    """Builds the quickstart config shrunk to TINY, with extra overrides, in tmp_path."""
    from semiseg.config import load_config

    def make(*extra: str):
        return load_config(REPO / "experiments" / "quickstart.yaml",
                           [*TINY, f"tracking.uri={sqlite_uri}",
                            f"ray.storage_path={tmp_path / 'ray'}", *extra])

    return make
