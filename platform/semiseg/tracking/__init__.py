"""MLflow, and the only package that imports it. Split by who reads it:

- runs: the run lifecycle, for the sweep driver and the trial runner (where runs live,
  experiments, parent and child runs, which config hashes already FINISHED);
- logger (with spool): RunLogger, which logs to one run by id and spools what an unreachable
  server cannot take; flush_spools replays earlier spools;
- callback: MlflowCallback, the engine callback a trial's rank-0 worker logs through;
- queries: runs, metric histories, per-image metrics and checkpoints read back for the report,
  the dashboard and `semiseg pseudolabel`.

Callers use `from semiseg import tracking; tracking.X`; every public name is re-exported here.
"""

from semiseg.tracking.callback import MlflowCallback
from semiseg.tracking.errors import TrackingUnavailable, TrackingWarning
from semiseg.tracking.logger import SPOOL_WAIT_S, RunLogger, flush_spools
from semiseg.tracking.queries import (
    download_checkpoint,
    metric_histories,
    parent_runs,
    per_image_metrics,
    search_runs,
)
from semiseg.tracking.runs import (
    CONFIG_HASH_TAG,
    PARENT_TAG,
    PER_IMAGE_ARTIFACT,
    ROLE_TAG,
    check_reachable,
    close_open_children,
    ensure_experiment,
    finished_hashes,
    resolve_uri,
    start_run,
)
from semiseg.tracking.spool import SPOOL_GLOB, Spool, describe, spool_path, spool_root

__all__ = [
    "CONFIG_HASH_TAG", "PARENT_TAG", "PER_IMAGE_ARTIFACT", "ROLE_TAG", "SPOOL_GLOB", "SPOOL_WAIT_S",
    "MlflowCallback", "RunLogger", "Spool", "TrackingUnavailable", "TrackingWarning",
    "check_reachable", "close_open_children", "describe", "download_checkpoint",
    "ensure_experiment", "finished_hashes", "flush_spools", "metric_histories", "parent_runs",
    "per_image_metrics", "resolve_uri", "search_runs", "spool_path", "spool_root", "start_run",
]
