"""The sizes each part runs at: full (one H100/H200, all parts within 8 minutes) or smoke (toy
sizes on a CPU, all parts within a minute, so CI keeps the script from rotting)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    image_size: int
    batch_size: int
    num_images: int
    model: tuple[str, ...]
    """Extra config overrides for every trainer (e.g. a smaller U-Net in smoke mode)."""
    warmup_steps: int
    steps: int
    """Training steps per timed sample."""
    rounds: int
    """Interleaved samples per method or variant."""
    p6_steps: int
    """P6: steps every variant trains before its loss is compared (compilation happens here)."""
    trials: int
    """P3: trials, run concurrently under Ray Tune and one after another."""
    trial_gpus: float
    trial_cpus: float
    trial_overrides: tuple[str, ...]
    sam_model: str
    sam_size: int
    sam_images: int
    sam_batch: int
    compile_backend: str

    def step_args(self) -> argparse.Namespace:
        """What bench/step_time.build reads."""
        return argparse.Namespace(image_size=self.image_size, batch_size=self.batch_size,
                                  num_images=self.num_images)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Sizes(
    image_size=128, batch_size=16, num_images=120, model=(), warmup_steps=5, steps=20, rounds=3,
    p6_steps=50, trials=8, trial_gpus=0.125, trial_cpus=1.0,
    trial_overrides=("data.image_size=64", "data.num_images=120", "data.batch_size=8",
                     "train.epochs=2", "train.steps_per_epoch=25", "tracking.overlays=0"),
    sam_model="vit_t", sam_size=512, sam_images=64, sam_batch=32, compile_backend="inductor",
)
SMOKE = Sizes(
    image_size=32, batch_size=2, num_images=30, model=("model.base_channels=4", "model.depth=2"),
    warmup_steps=1, steps=2, rounds=2, p6_steps=4, trials=2, trial_gpus=0.0, trial_cpus=0.5,
    trial_overrides=("data.image_size=32", "data.num_images=30", "data.batch_size=2",
                     "model.base_channels=4", "model.depth=2", "train.epochs=1",
                     "train.steps_per_epoch=2", "tracking.overlays=0"),
    sam_model="tiny", sam_size=64, sam_images=2, sam_batch=2, compile_backend="aot_eager",
)


def median(values: list[float]) -> float:
    return float(statistics.median(values))
