"""Live sweep progress in the terminal: trials done / running / pending, best Dice per method;
and, unless --verbose, none of Ray's notices that say nothing about the sweep (ray_output)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import types
from typing import Any, Iterator

from ray.tune import Callback

from semiseg import tracking


class SweepProgress(Callback):
    def __init__(self, num_trials: int, epochs: int, stream: Any = None) -> None:
        self.num_trials = num_trials
        self.epochs = epochs
        self.stream = stream  # None: sys.stdout at print time (Tune pickles callbacks)
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.running: set[str] = set()
        self.best: dict[str, float] = {}

    def _say(self, text: str) -> None:
        counts = (f"[{len(self.done)} done, {len(self.running)} running, "
                  f"{self.num_trials - len(self.done) - len(self.failed) - len(self.running)} pending"
                  + (f", {len(self.failed)} failed" if self.failed else "") + "]")
        best = "  ".join(f"{m} best val dice {d:.3f}" for m, d in sorted(self.best.items()))
        print(f"{counts} {text}" + (f" | {best}" if best else ""), file=self.stream or sys.stdout, flush=True)

    @staticmethod
    def _label(trial: Any) -> str:
        t = trial.config["trial"]
        return f"{t['method']['name']} f={t['data']['label_fraction']:g} seed={t['train']['seed']}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._say(f"started {self._label(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        method = trial.config["trial"]["method"]["name"]
        dice = result.get("val/dice_mean")
        if dice is not None:
            self.best[method] = max(self.best.get(method, -1.0), float(dice))
            self._say(f"{self._label(trial)} epoch {int(result.get('epoch', 0)) + 1}/{self.epochs} "
                      f"val dice {dice:.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._say(f"finished {self._label(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.failed.add(trial.trial_id)
        self._say(f"FAILED {self._label(trial)}")


class TrialProgress:
    """SweepProgress's lines for one trial that runs without Tune (a one-trial grid runs in the
    driver, semiseg.distributed.tune): a thread reads the trial's val Dice from its MLflow run
    every `interval_s` and prints each new epoch, so the lines come once MLflow has the epoch."""

    def __init__(self, trial: dict[str, Any], epochs: int, uri: str, interval_s: float = 2.0,
                 stream: Any = None) -> None:
        self.board = SweepProgress(1, epochs, stream)
        self.trial = types.SimpleNamespace(trial_id="", config={"trial": trial})  # as Tune's Trial
        self.uri, self.interval_s = uri, interval_s
        self.shown: set[int] = set()
        self._lock = threading.Lock()  # one epoch, one line: the thread and stop() both show
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, run_id: str) -> None:
        """Start showing the epochs of the trial's MLflow run `run_id`."""
        self.trial.trial_id = run_id
        self.board.on_trial_start(0, [], self.trial)
        self._thread = threading.Thread(target=self._poll, name="semiseg-progress", daemon=True)
        self._thread.start()

    def stop(self, failed: bool) -> None:
        """Show the epochs not shown yet, then the trial's end."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._show_new_epochs()
        end = self.board.on_trial_error if failed else self.board.on_trial_complete
        end(0, [], self.trial)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._show_new_epochs()

    def _show_new_epochs(self) -> None:
        try:
            rows = tracking.metric_histories(self.uri, [self.trial.trial_id], ["val/dice_mean"])
        except Exception:  # noqa: BLE001 - e.g. the server is down: the trial spools, we wait
            return
        with self._lock:
            for step, dice in sorted(zip(rows["step"], rows["value"])):
                if int(step) not in self.shown:
                    self.shown.add(int(step))
                    self.board.on_trial_result(0, [], self.trial,
                                               {"val/dice_mean": dice, "epoch": step})



# ---- quiet by default: Ray's notices that say nothing about the sweep ---------------------
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# The raylet's "N PYTHON worker processes have been started ... maximum expected startup
# concurrency": Tune trial actors hold no CPU (their Train workers do), so Ray counts more
# workers than CPUs and warns, although nothing is wrong.
NOISE = (re.compile(r"PYTHON worker processes have been started on node"),)


def _is_noise(line: str) -> bool:
    return any(pattern.search(line) for pattern in NOISE)


@contextlib.contextmanager
def ray_output(verbose: bool = False) -> Iterator[None]:
    """Around connecting to Ray and running the Tuner: unless verbose, hide Ray's
    token-authentication notice, the raylet's worker-count warnings and Tune's configuration
    box ("Configuration for experiment", "View detailed results here"). SweepProgress's live
    trial lines, Ray's errors and its other warnings still show. Everything is restored on exit."""
    if verbose:
        yield
        return
    import ray._private.worker as ray_worker

    token_logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    saved_level, saved_print = token_logger.level, ray_worker.print_to_stdstream
    saved_output = os.environ.get("RAY_AIR_NEW_OUTPUT")

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if not _is_noise(line)]
        if lines:
            saved_print({**data, "lines": lines}, ignore_prefix)

    token_logger.setLevel(logging.ERROR)
    # Tune's new output engine prints its configuration box even at verbose=0 (Ray 2.60); its
    # legacy engine, Ray's documented switch RAY_AIR_NEW_OUTPUT=0, prints nothing at verbose=0.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    ray_worker.print_to_stdstream = print_to_stdstream  # what Ray's error listener calls
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = saved_print
        token_logger.setLevel(saved_level)
        if saved_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_output
