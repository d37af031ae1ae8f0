"""The engine callback that logs a trial from its rank-0 worker (engine.fit knows no MLflow)."""

from __future__ import annotations

import math
import numbers
import tempfile
import warnings
from pathlib import Path
from typing import Any

from semiseg.tracking.errors import TrackingWarning
from semiseg.tracking.logger import RunLogger
from semiseg.tracking.runs import PER_CASE_ARTIFACT, PER_IMAGE_ARTIFACT


class MlflowCallback:
    """Engine callback (rank 0): epoch metrics, then test metrics, per-image test metrics (and
    per-case ones for a volume dataset) and overlays of a trial.

    skip_epochs: epochs the run already has (or spools), so a worker restarted from a
    checkpoint older than its last logged epoch logs each epoch once.
    system_metrics: also run MLflow's system-metrics monitor (`system/...` metrics of this
    worker's machine) from now until the fit ends (tracking.system_metrics)."""

    def __init__(self, logger: RunLogger, skip_epochs: set[int] | None = None,
                 system_metrics: bool = False) -> None:
        self.logger = logger
        self.skip_epochs = skip_epochs or set()
        self.monitor = logger.start_system_metrics() if system_metrics else None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if epoch not in self.skip_epochs:
            self.logger.log_metrics(metrics, step=epoch)

    def on_fit_end(self, result: Any) -> None:
        from semiseg.overlays import write_overlays  # matplotlib only when a run finishes

        if not self.logger.logged_steps("best_epoch"):  # a restart after the test logged it
            self.logger.log_metrics({**result.test_metrics, "best_epoch": result.best_epoch,
                                     "best_val_dice": result.best_val_dice})
        per_image = per_image_rows(getattr(result, "per_image", None))
        if per_image:  # rewritten whole on a restart: the same file, never a duplicate
            self.logger.log_dict(per_image, PER_IMAGE_ARTIFACT)
        per_case = per_image_rows(getattr(result, "per_case", None), PER_CASE_ARTIFACT)  # volumes
        if per_case:
            self.logger.log_dict(per_case, PER_CASE_ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            if write_overlays(result.examples, Path(tmp)):
                self.logger.log_files(Path(tmp), "overlays")
        if self.monitor is not None:
            self.monitor.finish()  # and logs a last sample
        self.logger.close()


def per_image_rows(per_image: Any, artifact: str = PER_IMAGE_ARTIFACT) -> list[dict[str, Any]]:
    """FitResult.per_image ({id, metric: value} per test image) as plain JSON: numbers become
    floats and undefined ones (NaN, inf) null, so any JSON reader can parse the artifact.
    [] when there is nothing to log; a malformed value is named in a warning, not raised,
    because the trial has already trained."""
    if not per_image:
        return []
    if not isinstance(per_image, list) or not all(isinstance(row, dict) for row in per_image):
        warnings.warn(f"FitResult.per_image is not a list of dicts (got {type(per_image).__name__}"
                      f"); {artifact} is not logged", TrackingWarning, stacklevel=3)
        return []
    return [{key: _plain(value) for key, value in row.items()} for row in per_image]


def _plain(value: Any) -> Any:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # e.g. a numpy int64 image index, which json cannot write
    return value
