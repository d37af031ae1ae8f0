"""Give back the CPUs/GPUs of a trial that Tune stops (ASHA) before its TorchTrainer ends.

With Ray Train V2 under Tune, the TorchTrainer's controller creates the worker group's placement
group, and that group lives as long as the Tune driver: when Tune stops a trial, it ends the
trial's actor, not the controller's shutdown, so the group stays CREATED and keeps its resources
(ray-project/ray#54305; seen here with Ray 2.60: one CPU per stopped trial). On a 2-CPU machine
a sweep then hangs after its second ASHA stop, with its remaining trials waiting for CPUs.

The fix: rank 0 reports the id of the placement group it runs in with every epoch's metrics
(PLACEMENT_GROUP_KEY; only Tune sees it, not MLflow), and FreeStoppedTrials, a Tune callback on
the driver, removes that group once the trial is complete or has failed, unless the trainer
already did (a trial that ran to its end).
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune
from ray.util import placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup, get_current_placement_group

PLACEMENT_GROUP_KEY = "ray/placement_group"


def current_placement_group() -> str:
    """Hex id of the placement group this Train worker runs in ('' outside one)."""
    group = get_current_placement_group()
    return group.id.hex() if group is not None else ""


class FreeStoppedTrials(tune.Callback):
    """Remove the worker group's placement group of each trial that Tune has finished with."""

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}  # trial id -> hex id of its worker group's placement group

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(PLACEMENT_GROUP_KEY):
            self.groups[trial.trial_id] = result[PLACEMENT_GROUP_KEY]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.free(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.free(trial.trial_id)

    def free(self, trial_id: str) -> bool:
        """Remove the trial's group if it is still there; True if it was removed now."""
        hex_id = self.groups.pop(trial_id, "")
        if not hex_id or placement_group_table().get(hex_id, {}).get("state", "REMOVED") == "REMOVED":
            return False
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
        return True
