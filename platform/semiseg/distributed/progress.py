"""Live sweep progress in the terminal: trials done / running / pending, best Dice per method."""

from __future__ import annotations

import sys
from typing import Any

from ray.tune import Callback


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

