"""What a trial cost in Ray resources, logged to its run as `cost/...` metrics, for the report's
Dice gained per compute-hour (semiseg.report_cost).

Reserved resource-seconds, as Ray accounts for a trial: each TrainStage's TorchTrainer.fit()
holds ray.num_workers workers of ray.cpus_per_worker CPUs (and ray.gpus_per_worker GPUs with
ray.use_gpu) for its wall-clock time; the rest of a trial that has a PseudoLabelStage (SAM
refinement, semiseg.distributed.pseudolabel) holds sam.num_actors SAM actors plus a reader and
a writer, each of sam.cpus_per_actor CPUs (the SAM actors also sam.gpus_per_actor GPUs).
Deviations: reserved, not used (MLflow's system metrics, tracking.system_metrics, show the
use); the driver and the Tune trial actor (0 CPUs) are not counted; a trial's time waiting in
Ray's queue is not counted, since the clock starts when the trial's run does.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from semiseg.config import Config
from semiseg.methods import METHODS, PseudoLabelStage

Train = Callable[[Config, "str | None", str], Any]  # as semiseg.distributed.stages.Trainer


class TrialCost:
    """Started when the trial starts; `timed` wraps the stage runner's TorchTrainer call."""

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        self.start = clock()
        self.train_s = 0.0

    def timed(self, train: Train) -> Train:
        def run(cfg: Config, run_id: str | None, name: str) -> Any:
            began = self.clock()
            try:
                return train(cfg, run_id, name)
            finally:
                self.train_s += self.clock() - began
        return run

    def metrics(self) -> dict[str, float]:
        """cost/wall_s (the trial so far), cost/train_s (inside TorchTrainer.fit), and the
        reserved cost/cpu_s and cost/gpu_s."""
        wall = self.clock() - self.start
        ray, sam = self.cfg.ray, self.cfg.sam
        gpus = ray.gpus_per_worker if ray.use_gpu else 0.0
        cpu_s = self.train_s * ray.num_workers * ray.cpus_per_worker
        gpu_s = self.train_s * ray.num_workers * gpus
        stages = METHODS.get(self.cfg.method.name).stages(self.cfg)
        if any(isinstance(s, PseudoLabelStage) for s in stages):
            rest = max(0.0, wall - self.train_s)
            cpu_s += rest * (sam.num_actors + 2) * sam.cpus_per_actor
            gpu_s += rest * sam.num_actors * sam.gpus_per_actor
        return {"cost/wall_s": wall, "cost/train_s": self.train_s, "cost/cpu_s": cpu_s,
                "cost/gpu_s": gpu_s}
