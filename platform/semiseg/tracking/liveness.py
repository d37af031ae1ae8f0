"""No run left RUNNING after its driver died: the sweep driver keeps a heartbeat tag on its
parent run, and the next `semiseg sweep` or `semiseg report` on the experiment ends the runs
whose heartbeat stopped (the sweep and its RUNNING trials) as KILLED, saying why.

A driver killed with SIGKILL (or its machine lost) runs no `finally`, so only a later process
can close its runs. The heartbeat is how that process tells a dead sweep from a live one on
another machine. Intervals: $SEMISEG_HEARTBEAT_S (default 30 s) and $SEMISEG_STALE_AFTER_S
(default 600 s, i.e. 20 missed beats, so a tracking server down for a few minutes does not
get a live sweep ended). If it does happen, the live sweep still sets each run's final status
when it ends; only the tags say it was once taken for dead.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

from mlflow.tracking import MlflowClient

from semiseg.tracking.errors import is_transient
from semiseg.tracking.runs import CLOSED_BY_TAG, END_REASON_TAG, PARENT_TAG, ROLE_TAG

HEARTBEAT_TAG = "semiseg.heartbeat"  # UTC ISO time of the driver's last beat
HEARTBEAT_S = float(os.environ.get("SEMISEG_HEARTBEAT_S", "30"))
STALE_AFTER_S = float(os.environ.get("SEMISEG_STALE_AFTER_S", "600"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Heartbeat:
    """Sets HEARTBEAT_TAG on a run now and then every `every_s` seconds from a daemon thread,
    until stop(). A beat the server does not take is skipped: the next one may get through."""

    def __init__(self, uri: str, run_id: str, every_s: float = HEARTBEAT_S) -> None:
        self.client, self.run_id, self.every_s = MlflowClient(uri), run_id, every_s
        self._stop = threading.Event()
        self.beat()  # before the thread: a run is never seen without one
        self._thread = threading.Thread(target=self._run, name="semiseg-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        try:
            self.client.set_tag(self.run_id, HEARTBEAT_TAG, _now())
        except Exception as exc:
            if not is_transient(exc):
                raise

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except Exception:  # e.g. the run was deleted: nothing left to keep alive
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 30)


def _age_s(beat: str | None, start_time_ms: int, now: float) -> float:
    """Seconds since the last beat; since the run started when it has none (an older semiseg)."""
    if beat:
        try:
            return now - datetime.fromisoformat(beat).timestamp()
        except ValueError:
            pass
    return now - start_time_ms / 1000


def end_stale_runs(uri: str, experiment: str, ended_by: str,
                   stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """End as KILLED the experiment's RUNNING sweeps whose heartbeat is older than
    stale_after_s, and the RUNNING trials of those sweeps and of sweeps that already ended.
    Tags each with CLOSED_BY_TAG = ended_by and END_REASON_TAG; returns one line per run ended.
    [] when the experiment does not exist (yet)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    now = time.time()
    sweeps = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=50000)
    lines, dead = [], set()
    for run in sweeps:
        if run.info.status != "RUNNING":
            dead.add(run.info.run_id)
            continue
        age = _age_s(run.data.tags.get(HEARTBEAT_TAG), run.info.start_time, now)
        if age > stale_after_s:
            dead.add(run.info.run_id)
            reason = (f"its sweep driver stopped: no heartbeat for {age:.0f} s "
                      f"(more than {stale_after_s:.0f} s)")
            lines.append(_kill(client, run, ended_by, reason))
    query = f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'RUNNING'"
    for run in client.search_runs([exp.experiment_id], query, max_results=50000):
        parent = run.data.tags.get(PARENT_TAG)
        if parent in dead:
            lines.append(_kill(client, run, ended_by, f"its sweep {parent} is no longer running"))
    return lines


def _kill(client: MlflowClient, run, ended_by: str, reason: str) -> str:
    client.set_tag(run.info.run_id, CLOSED_BY_TAG, ended_by)
    client.set_tag(run.info.run_id, END_REASON_TAG, reason)
    client.set_terminated(run.info.run_id, "KILLED")
    role = run.data.tags.get(ROLE_TAG, "run")
    return f"ended stale {role} run {run.info.run_name} ({run.info.run_id}) as KILLED: {reason}"
