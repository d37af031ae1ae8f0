"""Connecting to Ray: a new local instance, the cluster a Ray Job runs in, or a given address."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import ray
from ray._private import ray_constants

import semiseg


# A Ray that this process starts is one machine that no autoscaler drains, so Ray Train's
# preemption watcher (one more actor process per trial, Ray 2.60) has nothing to watch there.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    """Make the semiseg package importable on every worker, wherever the driver came from;
    `extra_env`: more variables for every worker (a value set in this environment wins)."""
    source = str(Path(semiseg.__file__).resolve().parent.parent)  # the platform/ folder
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    extra = {k: os.environ.get(k, v) for k, v in (extra_env or {}).items()}
    return {"env_vars": {**extra, "PYTHONPATH": path}}


def connect(address: str) -> None:
    """address '' joins $RAY_ADDRESS when set (as under `ray job submit`), else starts a local
    Ray bound to 127.0.0.1; 'local' always starts one; anything else is joined as given."""
    if ray.is_initialized():
        return
    if address == "" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address in ("", "local"):
        with _loopback_only():
            ray.init(address="local", include_dashboard=False,
                     runtime_env=runtime_env(LOCAL_RAY_ENV), _node_ip_address="127.0.0.1",
                     configure_logging=False, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False)


# Ray's switch for its single-machine mode (the default on macOS and Windows), read at import.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """A local Ray that only 127.0.0.1 can reach. On Linux, Ray replaces _node_ip_address=
    "127.0.0.1" with the machine's routable IP (services.resolve_ip_for_localhost) and its GCS,
    raylet and agents then listen on every interface: anyone on the network could submit
    work. In single-machine mode the node IP stays 127.0.0.1 and every listener binds to it.
    The processes ray.init starts inherit the variable; the flag is restored afterwards, so a
    later join of a real cluster from this process is unaffected."""
    saved_env, saved_flag = os.environ.get(_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = saved_env


def storage_path(configured: str) -> str:
    """Ray needs an absolute local path or a URI (s3://, gs://) for checkpoints."""
    return configured if "://" in configured else str(Path(configured).resolve())
