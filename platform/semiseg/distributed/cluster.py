"""Connecting to Ray: a new local instance, the cluster a Ray Job runs in, or a given address."""

from __future__ import annotations

import os
from pathlib import Path

import ray

import semiseg


def runtime_env() -> dict:
    """Make the semiseg package importable on every worker, wherever the driver came from."""
    source = str(Path(semiseg.__file__).resolve().parent.parent)  # the platform/ folder
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def connect(address: str) -> None:
    """address '' joins $RAY_ADDRESS when set (as under `ray job submit`), else starts a local
    Ray bound to 127.0.0.1; 'local' always starts one; anything else is joined as given."""
    if ray.is_initialized():
        return
    if address == "" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address in ("", "local"):
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env(),
                 _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False)


def storage_path(configured: str) -> str:
    """Ray needs an absolute local path or a URI (s3://, gs://) for checkpoints."""
    return configured if "://" in configured else str(Path(configured).resolve())
