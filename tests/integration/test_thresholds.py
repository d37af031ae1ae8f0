"""Threshold sweeps under ASHA (experiments/thresholds.yaml, shrunk): a real sweep on a real local
Ray, checked through the MLflow store. A trial that ASHA stops ends KILLED with the epochs it
logged, and gives its CPU back; a trial that reaches its last epoch is scored on test; the
report selects each method's threshold on val, never on test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from semiseg import report
from semiseg.config import load_config
from semiseg.distributed.tune import _scheduler, run_sweep

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EPOCHS, GRACE = 8, 2  # ASHA's rungs: epochs 2 and 8, the last; a trial stopped at 2 has 6 to go,
# so the epoch or so it may still run before its workers end cannot reach the last one.
# Thresholds 0.95 and 0.8 train well; 0.0 makes every pixel of the untrained model's guesses a
# pseudo-label, which val Dice after two epochs shows far behind (about 0.15 against 0.5). It
# comes last in the grid, so both others are at the first rung before it: it is stopped there.
# Which of the two others reports first at that rung is a race; the later one is stopped too
# when it is behind, so the test holds for one or two FINISHED trials.
THRESHOLDS = [0.95, 0.8, 0.0]


def _config(*extra: str):
    return load_config(REPO / "experiments" / "thresholds.yaml", list(extra))


@pytest.mark.parametrize("epochs, grace", [(4, 1), (2, 2), (2, 5), (8, 2), (12, 3), (15, 3)])
def test_asha_never_stops_a_trial_at_its_last_epoch(epochs: int, grace: int) -> None:
    """A trial behind another at a rung before the last epoch is stopped; at the last epoch's
    report it continues to its test, also where a rung falls on that epoch."""
    scheduler = _scheduler(_config(f"train.epochs={epochs}", f"sweep.grace_period={grace}"))
    ahead, behind = Trial("trial", stub=True), Trial("trial", stub=True)
    for trial in (ahead, behind):
        scheduler.on_trial_add(None, trial)
    rungs = [milestone for bracket in scheduler._brackets for milestone, _ in bracket._rungs]
    for step in range(1, epochs + 1):  # the leader first: every rung has a cutoff for the other
        assert scheduler.on_trial_result(None, ahead, {"training_iteration": step, "val/dice_mean": 0.9}) == "CONTINUE"
    early = [step for step in rungs if step < epochs]
    for step in early[-1:]:
        assert scheduler.on_trial_result(None, behind, {"training_iteration": step, "val/dice_mean": 0.1}) == "STOP"
    assert scheduler.on_trial_result(None, behind, {"training_iteration": epochs, "val/dice_mean": 0.0}) == "CONTINUE"


def _held_cpus(ray, wait_s: float = 10.0) -> float:
    """CPUs still held by placement groups, once the removals had a few seconds to land."""
    import time

    from ray.util import placement_group_table

    deadline = time.time() + wait_s
    while True:
        held = sum(b.get("CPU", 0.0) for g in placement_group_table().values()
                   if g["state"] != "REMOVED" for b in g["bundles"].values())
        if held == 0 or time.time() > deadline:
            return held
        time.sleep(0.5)


def _threshold(run) -> float:
    return float(run.data.params["method.params.threshold"])


def test_threshold_sweep_under_asha(ray_local, sqlite_uri: str, tiny_config) -> None:
    cfg = tiny_config(
        "sweep.methods=[pseudo_label]", "sweep.label_fractions=[0.25]", "sweep.seeds=[0]",
        f"sweep.params={{pseudo_label.threshold: {THRESHOLDS}}}", "sweep.scheduler=asha",
        f"sweep.grace_period={GRACE}", f"train.epochs={EPOCHS}", "train.steps_per_epoch=12",
        "model.base_channels=8", "ray.max_concurrent_trials=2", "tracking.overlays=0",
        "tracking.log_model=false")
    outcome = run_sweep(cfg, "it-thresholds")
    # Tune stopped trials mid-fit: their worker groups' CPUs are free again (stopped.py).
    assert _held_cpus(ray_local) == 0
    client = MlflowClient(outcome.uri)
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert sorted(map(_threshold, runs)) == sorted(THRESHOLDS)
    val_steps = {r.info.run_id: sorted(m.step for m in client.get_metric_history(r.info.run_id, "val/dice_mean"))
                 for r in runs}

    # Stopped by ASHA: KILLED, with every epoch it ran logged (a prefix, short of the last).
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert 0.0 in map(_threshold, killed), {_threshold(r): r.info.status for r in runs}
    for run in killed:
        steps = val_steps[run.info.run_id]
        assert steps == list(range(len(steps))) and GRACE <= len(steps) < EPOCHS
        loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert loss_steps == steps
        assert not any(k.startswith("test") for k in run.data.metrics) and "best_epoch" not in run.data.metrics
        assert run.data.tags["semiseg.closed_by"] == "sweep driver"

    # Reached its last epoch: FINISHED and scored on test (ASHA's rung on the last epoch
    # must not stop it before its test).
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert finished and {r.info.status for r in runs} == {"KILLED", "FINISHED"}
    for run in runs:
        reached_last = val_steps[run.info.run_id] == list(range(EPOCHS))
        assert reached_last == (run.info.status == "FINISHED"), (run.info.status, val_steps[run.info.run_id])
    for run in finished:
        metrics = run.data.metrics
        assert 0.0 <= metrics["test/dice_mean"] <= 1.0
        assert all(f"test/dice/{c}" in metrics for c in ("lung", "heart", "spine"))
        assert 0 <= metrics["best_epoch"] < EPOCHS and "best_val_dice" in metrics

    # The report: only FINISHED trials, and the threshold with the best val Dice, not test.
    trials = report.finished_trials(outcome.uri, "quickstart", outcome.parent_run_id)
    assert set(trials["run_id"]) == {r.info.run_id for r in finished}
    by_val = max(finished, key=lambda r: r.data.metrics["best_val_dice"])
    (best,) = report.best_configs(trials).to_dict("records")
    assert json.loads(best["params"])["threshold"] == _threshold(by_val)
    assert best["val_mean"] == pytest.approx(by_val.data.metrics["best_val_dice"])
    assert best["dice_mean"] == pytest.approx(by_val.data.metrics["test/dice_mean"])
    assert best["configs"] == len(finished)
    by_test = max(finished, key=lambda r: r.data.metrics["test/dice_mean"])
    if by_test.info.run_id != by_val.info.run_id:  # then the test-best is visibly not chosen
        assert json.loads(best["params"])["threshold"] != _threshold(by_test)
