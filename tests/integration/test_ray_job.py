"""`ray job submit --working-dir <fresh clone> -- semiseg sweep experiments/quickstart.yaml`
against a real local head, waited on until SUCCEEDED, then its MLflow runs checked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _ray(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _submit_when_agent_is_up(args: list[str], wait_s: float = 90) -> subprocess.CompletedProcess:
    """The head's job agent starts after its ports open (later still on a loaded machine); Ray
    answers "No available agent to submit job, please try again later" until then."""
    deadline = time.time() + wait_s
    while True:
        submit = _ray(*args)
        if "No available agent" not in submit.stderr or time.time() > deadline:
            return submit
        time.sleep(2)


def test_ray_job_submit_from_a_fresh_clone(ray_head, tmp_path: Path, tiny_overrides) -> None:
    clone = tmp_path / "clone"
    if (REPO / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    else:  # a source tarball: copy what git would have
        pytest.skip("not a git checkout")
    db = tmp_path / "mlruns" / "mlflow.db"  # absolute: a job runs in a temp copy of its dir
    submit_args = ["job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
                   "--submission-id", "semiseg-it", "--working-dir", str(clone), "--",
                   "semiseg", "sweep", "experiments/quickstart.yaml", *tiny_overrides,
                   "sweep.label_fractions=[0.5]", f"tracking.uri=sqlite:///{db}",
                   f"ray.storage_path={tmp_path / 'ray'}"]
    submit = _submit_when_agent_is_up(submit_args)
    assert submit.returncode == 0, submit.stderr
    deadline = time.time() + 480
    while True:
        status = _ray("job", "status", "--address", ray_head.dashboard_url, "semiseg-it").stdout.upper()
        if "SUCCEEDED" in status or "FAILED" in status or time.time() > deadline:
            break
        time.sleep(3)
    logs = _ray("job", "logs", "--address", ray_head.dashboard_url, "semiseg-it").stdout
    assert "SUCCEEDED" in status, status + logs[-3000:]
    assert "test Dice" in logs
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # sweep + its trial
