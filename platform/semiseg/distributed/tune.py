"""`semiseg sweep`: a Ray Tune grid over method x label fraction x seed (x method params).

Train V2 pattern: each Tune trial runs a function that builds its own TorchTrainer and relays
worker reports to Tune through TuneReportCallback. MLflow gets one parent run per sweep and one
nested child run per trial. A lone trial to run (`semiseg train`) skips Tune: the driver runs
its TorchTrainer itself (_run_one).
"""

from __future__ import annotations

import copy
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ray import tune
from ray.train._internal.session import get_session  # Tune's session of a trial actor
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from semiseg import tracking
from semiseg.config import Config, from_dict, method_grid
from semiseg.distributed.cluster import connect, storage_path
from semiseg.distributed.progress import SweepProgress, TrialProgress, ray_output
from semiseg.distributed.stopped import FreeStoppedTrials
from semiseg.distributed.train import run_tracked_trial
from semiseg.errors import ConfigError, SemisegError
from semiseg.methods import FULL_SUPERVISION_METHOD
from semiseg.preflight import check_paths


def expand_grid(cfg: Config) -> list[dict[str, Any]]:
    """One plain config dict per trial: methods x their param grids x fractions x seeds, plus
    the full-supervision method at fraction 1.0 per seed when sweep.full_supervision is on."""
    base = cfg.to_dict()
    if cfg.data.labeled_cases and len(set(cfg.sweep.label_fractions)) > 1:
        raise ConfigError(f"data.labeled_cases={cfg.data.labeled_cases} fixes the labeled cases, "
                          f"so sweep.label_fractions={cfg.sweep.label_fractions} would train one "
                          "split several times; give one label fraction or data.labeled_cases=0")
    trials = []
    for setting in method_grid(cfg):
        for fraction, seed in itertools.product(cfg.sweep.label_fractions, cfg.sweep.seeds):
            trials.append(_trial(base, setting.name, setting.params, fraction, seed))
    if cfg.sweep.full_supervision:
        every = {**base, "data": {**base["data"], "labeled_cases": 0}}  # all cases labeled
        full = [_trial(every, FULL_SUPERVISION_METHOD, {}, 1.0, seed) for seed in cfg.sweep.seeds]
        trials += [t for t in full if t not in trials]
    # Seed-major order: a partial sweep already compares every method on the first seeds.
    return sorted(trials, key=lambda t: t["train"]["seed"])


def _trial(base: dict[str, Any], method: str, params: dict[str, Any], fraction: float,
           seed: int) -> dict[str, Any]:
    trial = copy.deepcopy(base)
    trial["method"] = {"name": method, "params": params}
    trial["data"]["label_fraction"] = fraction
    trial["train"]["seed"] = seed
    return trial


def _tune_trial(config: dict[str, Any]) -> None:
    """Runs inside a Tune trial actor; the TorchTrainer it starts does the training."""
    cfg = from_dict(config["trial"], source="trial")
    run_tracked_trial(cfg, config["uri"], config["experiment_id"], config["parent_run_id"],
                      callbacks=[TuneReportCallback()], stopped=_stop_requested())


def _stop_requested() -> Callable[[], bool]:
    """Whether Tune has stopped this trial: its session's stop event, which Tune sets before it
    tears the session down (a stopped trial's TorchTrainer.fit then raises from its reports;
    whether that comes before the actor exits is a race, seen in CI as a FAILED run)."""
    session = get_session()
    return lambda: session is not None and session.stop_event.is_set()


class SweepFailed(SemisegError):
    """One or more trials of a sweep failed."""


@dataclass
class SweepOutcome:
    uri: str
    parent_run_id: str
    config_hashes: list[str]  # every trial of the grid, run now or earlier
    skipped: int              # trials already FINISHED with the same config hash


def run_sweep(cfg: Config, sweep_name: str = "sweep", force: bool = False,
              verbose: bool = False) -> SweepOutcome:
    """Run the grid's trials that have not already FINISHED with the same config hash in this
    experiment (all of them with force), so a rerun or a nightly job trains only what is new.
    verbose: also show Ray's notices and Tune's configuration box (progress.ray_output)."""
    check_paths(cfg)  # data.root, resolved: trials run in other dirs
    cfg.ray.storage_path = storage_path(cfg.ray.storage_path)
    trials = expand_grid(cfg)
    # A bad trial fails here, before any store or Ray session exists (loading the config
    # already checked every method setting of the grid).
    hashes = [from_dict(t, source="sweep trial").config_hash() for t in trials]
    uri = tracking.resolve_uri(cfg.tracking.uri)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    _flush_spools(cfg.ray.storage_path)  # what earlier runs could not log, before skipping
    for line in tracking.end_stale_runs(uri, cfg.tracking.experiment, "semiseg sweep"):
        print(line, flush=True)  # runs a killed driver left RUNNING
    done = set() if force else tracking.finished_hashes(uri, experiment_id)
    todo = [t for t, h in zip(trials, hashes) if h not in done]
    print(f"{len(trials)} trials in the grid; {len(trials) - len(todo)} already finished with the "
          f"same config (skipped{'' if force else '; --force reruns them'}); {len(todo)} to run",
          flush=True)
    parent = tracking.start_run(uri, experiment_id, sweep_name, "sweep",
                                {"trials": str(len(trials)), "skipped": str(len(trials) - len(todo))})
    logger = tracking.RunLogger(uri, parent, tracking.spool_path(
        cfg.ray.storage_path, f"{sweep_name}-{parent[:8]}", "sweep"))
    logger.log_params(cfg.flat())
    logger.log_dict(hashes, "config_hashes.json")
    heartbeat = tracking.Heartbeat(uri, parent)  # if this driver dies, a later sweep ends its runs
    status = "FAILED"
    try:
        if todo:
            with ray_output(verbose):
                connect(cfg.ray.address)
                _run_trials(cfg, todo, uri, experiment_id, parent, sweep_name)
        status = "FINISHED"
    finally:
        heartbeat.stop()
        # Trials whose server was down at their end spooled their status: send it first.
        _flush_spools(cfg.ray.storage_path)
        # Trials stopped by ASHA (or killed with their actor) cannot close their own run.
        tracking.close_open_children(uri, experiment_id, parent, "KILLED")
        logger.end(status)
    return SweepOutcome(uri, parent, hashes, len(trials) - len(todo))


def _flush_spools(storage: str) -> None:
    """Upload spooled MLflow records; say loudly which are still missing, and where."""
    for line in tracking.flush_spools(storage):
        print(f"WARNING: not yet logged to MLflow (server unreachable): {line}", file=sys.stderr,
              flush=True)


def _run_trials(cfg: Config, trials: list[dict[str, Any]], uri: str, experiment_id: str,
                parent: str, sweep_name: str) -> None:
    if len(trials) == 1:
        _run_one(cfg, trials[0], uri, experiment_id, parent)
    else:
        _run_tuner(cfg, trials, uri, experiment_id, parent, sweep_name)


def _run_one(cfg: Config, trial: dict[str, Any], uri: str, experiment_id: str, parent: str) -> None:
    """One trial to run (`semiseg train`, or a rerun with one left) runs its TorchTrainer from
    this driver. Tune could not act on a lone trial (no ASHA cut, nothing to run beside it), and
    its trial actor costs a process start, imports and a controller loop on every trial: about
    4 s of the per-trial overhead on 2 cores (docs/BENCHMARKS.md, P1-cpu)."""
    progress = TrialProgress(trial, cfg.train.epochs, uri)
    try:
        run_tracked_trial(from_dict(trial, source="trial"), uri, experiment_id, parent,
                          on_run=progress.watch)
    except Exception as exc:
        progress.stop(failed=True)
        raise SweepFailed(f"1 of 1 trials failed; first: {type(exc).__name__}: {exc}") from exc
    progress.stop(failed=False)


def _run_tuner(cfg: Config, trials: list[dict[str, Any]], uri: str, experiment_id: str,
               parent: str, sweep_name: str) -> None:
    tuner = tune.Tuner(
        # The trial actor only coordinates; its Train workers hold the CPUs/GPUs.
        tune.with_resources(_tune_trial, {"cpu": 0, "memory": 1e6}),
        param_space={"trial": tune.grid_search(trials), "uri": uri,
                     "experiment_id": experiment_id, "parent_run_id": parent},
        # A finished trial's actor runs the next trial: no process start and imports each time.
        # Not with ASHA: a trial it stops is still in TorchTrainer.fit, so its actor cannot
        # be reset, and the next trial would wait for it.
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.ray.max_concurrent_trials,
                                    scheduler=_scheduler(cfg),
                                    reuse_actors=cfg.sweep.scheduler == "fifo"),
        run_config=tune.RunConfig(
            name=f"{sweep_name}-{parent[:8]}", storage_path=cfg.ray.storage_path,
            callbacks=[SweepProgress(len(trials), cfg.train.epochs), FreeStoppedTrials()], verbose=0,
        ),
    )
    errors = [r.error for r in tuner.fit() if r.error is not None]
    if errors:
        raise SweepFailed(f"{len(errors)} of {len(trials)} trials failed; first: {errors[0]}")


class _ASHAUpToLastEpoch(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch's report. A rung can fall there
    (grace_period >= epochs, or epochs == grace_period * 4**k), and a trial stopped then has
    already trained: stopping it would only lose its test score and end its run KILLED."""

    def __init__(self, last_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)  # records the rung
        if result.get(self._time_attr, 0) >= self.last_epoch:
            return self.CONTINUE
        return action


def _scheduler(cfg: Config) -> ASHAScheduler | None:
    if cfg.sweep.scheduler == "fifo":
        return None
    # max_t one past the last epoch, so ASHA's own max_t stop never comes before the test.
    return _ASHAUpToLastEpoch(cfg.train.epochs, time_attr="training_iteration",
                              metric="val/dice_mean", mode="max", max_t=cfg.train.epochs + 1,
                              grace_period=min(cfg.sweep.grace_period, cfg.train.epochs))
