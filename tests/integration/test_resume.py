"""Resumable sweeps: after the driver is killed partway, a rerun trains only the trials not yet
FINISHED with the same config hash (a completed sweep rerun is in test_sweep.py)."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _finished_by_hash(uri: str, experiment: str) -> collections.Counter:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return collections.Counter()
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                              f"tags.`{tracking.ROLE_TAG}` = 'trial'")
    return collections.Counter(r.data.tags[tracking.CONFIG_HASH_TAG] for r in runs)


def _sweep_cmd(tiny_overrides: list[str], uri: str, tmp: Path) -> list[str]:
    return [sys.executable, "-m", "semiseg.cli", "sweep", str(REPO / "experiments" / "quickstart.yaml"),
            *tiny_overrides, f"tracking.uri={uri}", f"ray.storage_path={tmp / 'ray'}",
            "ray.address=local", "ray.max_concurrent_trials=1", "sweep.label_fractions=[0.2,1.0]"]


def test_killed_driver_rerun_completes_only_missing_trials(tmp_path: Path, tiny_overrides, sqlite_uri) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths are capped
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = _sweep_cmd(tiny_overrides, sqlite_uri, tmp_path)
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while sum(_finished_by_hash(sqlite_uri, "quickstart").values()) < 1:
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "no trial finished in 300 s"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        # Ray's own processes for that driver live in the same temp dir; end them too.
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    done_before = _finished_by_hash(sqlite_uri, "quickstart")
    assert sum(done_before.values()) == 1  # killed while the second trial ran
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    skipped = int(re.search(r"(\d+) already finished", rerun.stdout).group(1))
    assert skipped == sum(done_before.values())
    done_after = _finished_by_hash(sqlite_uri, "quickstart")
    assert len(done_after) == 2 and set(done_after.values()) == {1}  # each trial exactly once
    assert "(n=1)" in rerun.stdout  # the summary covers both, the skipped one included
