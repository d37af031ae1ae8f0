"""Resumable sweeps: after the driver is killed partway, a rerun trains only the trials not yet
FINISHED with the same config hash (a completed sweep rerun is in test_sweep.py), and ends as
KILLED the runs the dead driver left RUNNING (its heartbeat stopped).

Both drivers are `semiseg sweep` as a user runs it against a real Ray head started with
`ray start --head` (conftest.ray_head), joined through `ray.address`, with the default store;
`semiseg report` then reads that store."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
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


def _sweep_cmd(tiny_overrides: list[str], tmp: Path, address: str) -> list[str]:
    """No tracking.uri: the default store, an absolute sqlite file under the working directory's
    mlruns/ (which is conftest.sqlite_uri's file when run in tmp_path)."""
    return [sys.executable, "-m", "semiseg.cli", "sweep", str(REPO / "experiments" / "quickstart.yaml"),
            *tiny_overrides, f"ray.storage_path={tmp / 'ray'}",
            f"ray.address={address}", "ray.max_concurrent_trials=1", "sweep.label_fractions=[0.2,1.0]"]


def _running_trial(uri: str) -> bool:
    return any(r.info.status == "RUNNING" and r.data.tags.get(tracking.ROLE_TAG) == "trial"
               for r in _runs(uri, "quickstart"))


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_killed_driver_rerun_completes_only_missing_trials(ray_head, tmp_path: Path, tiny_overrides,
                                                          sqlite_uri) -> None:
    # A beat a second; stale after 3 s without one (defaults: 30 s and 10 min).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SEMISEG_HEARTBEAT_S": "1", "SEMISEG_STALE_AFTER_S": "3"}
    env.pop("RAY_ADDRESS", None)
    # Both drivers join the session's Ray head (no Ray start of their own); the killed one's
    # trial dies with it, as Ray ends a dead driver's actors.
    cmd = _sweep_cmd(tiny_overrides, tmp_path, ray_head.gcs_address)
    log = tmp_path / "driver.out"
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"),
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        # Killed once the first trial FINISHED and the second one's run is RUNNING.
        while sum(_finished_by_hash(sqlite_uri, "quickstart").values()) < 1 or not _running_trial(sqlite_uri):
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "no trial finished in 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the default store
    done_before = _finished_by_hash(sqlite_uri, "quickstart")
    assert sum(done_before.values()) == 1  # killed while the second trial ran
    printed = log.read_text()
    assert "started supervised" in printed  # quiet by default: the live trial lines, and not
    assert "Configuration for experiment" not in printed  # Tune's box
    left = {r.info.run_id: r for r in _runs(sqlite_uri, "quickstart") if r.info.status == "RUNNING"}
    roles = sorted(r.data.tags[tracking.ROLE_TAG] for r in left.values())
    assert roles == ["sweep", "trial"]  # the dead driver's sweep and the trial it was running
    assert all(r.data.tags.get("mlflow.source.name") == "semiseg sweep" for r in left.values())
    time.sleep(4)  # its heartbeat is now older than SEMISEG_STALE_AFTER_S
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    skipped = int(re.search(r"(\d+) already finished", rerun.stdout).group(1))
    assert skipped == sum(done_before.values())
    done_after = _finished_by_hash(sqlite_uri, "quickstart")
    assert len(done_after) == 2 and set(done_after.values()) == {1}  # each trial exactly once
    assert "(n=1)" in rerun.stdout  # the summary covers both, the skipped one included
    assert "test Dice" in rerun.stdout and re.search(r"\d done, 0 running, 0 pending", rerun.stdout)
    # The rerun ended what the dead driver left RUNNING, as KILLED, saying why; nothing is left.
    assert rerun.stdout.count("ended stale") == 2, rerun.stdout[-3000:]
    runs = {r.info.run_id: r for r in _runs(sqlite_uri, "quickstart")}
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []
    for run_id in left:
        run = runs[run_id]
        assert run.info.status == "KILLED"
        assert run.data.tags[tracking.CLOSED_BY_TAG] == "semiseg sweep"
    reasons = sorted(runs[r].data.tags[tracking.END_REASON_TAG] for r in left)
    assert "no heartbeat" in " ".join(reasons) and "is no longer running" in " ".join(reasons)

    # `semiseg report` on the default store: both label fractions, one seed each.
    report = subprocess.run([sys.executable, "-m", "semiseg.cli", "report", "quickstart"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    row = next(line for line in report.stdout.splitlines() if line.startswith("supervised"))
    assert row.count("(n=1)") == 2, report.stdout
