"""MLflow, and the only package that imports it. Split by who reads it:

- runs: the run lifecycle, for the sweep driver and the trial runner (where runs live,
  experiments, parent and child runs, which config hashes already FINISHED); source: the
  code a run came from (git commit, version) as the tags MLflow's UI shows;
- liveness: the sweep driver's heartbeat, and ending the runs of a driver that died;
- logger (with spool): RunLogger, which logs to one run by id and spools what an unreachable
  server cannot take; flush_spools replays earlier spools; its dataset inputs (inputs) and
  MLflow PyTorch model and system metrics (model);
- callback: MlflowCallback, the engine callback a trial's rank-0 worker logs through;
- queries: runs, metric histories, per-image metrics and checkpoints read back for the report,
  the dashboard and `semiseg pseudolabel`.

Callers use `from semiseg import tracking; tracking.X`; every public name is re-exported here.
"""

from semiseg.tracking.callback import MlflowCallback
from semiseg.tracking.errors import TrackingUnavailable, TrackingWarning
from semiseg.tracking.liveness import HEARTBEAT_TAG, Heartbeat, end_stale_runs
from semiseg.tracking.logger import SPOOL_WAIT_S, RunLogger, flush_spools
from semiseg.tracking.queries import (
    download_checkpoint,
    json_artifacts,
    metric_histories,
    parent_runs,
    per_image_metrics,
    runs_page,
    search_runs,
)
from semiseg.tracking.runs import (
    CLOSED_BY_TAG,
    CONFIG_HASH_TAG,
    END_REASON_TAG,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    PER_CASE_ARTIFACT,
    PER_IMAGE_ARTIFACT,
    ROLE_TAG,
    TRAINING_KIND,
    check_reachable,
    close_open_children,
    ensure_experiment,
    finished_hashes,
    resolve_uri,
    start_run,
)
from semiseg.tracking.source import VERSION_TAG, source_tags
from semiseg.tracking.spool import SPOOL_GLOB, Spool, describe, spool_path, spool_root

__all__ = [
    "CLOSED_BY_TAG", "CONFIG_HASH_TAG", "END_REASON_TAG", "EXPERIMENT_KIND_TAG", "HEARTBEAT_TAG",
    "PARENT_TAG", "PER_CASE_ARTIFACT", "PER_IMAGE_ARTIFACT", "ROLE_TAG", "SPOOL_GLOB", "SPOOL_WAIT_S", "TRAINING_KIND",
    "VERSION_TAG", "Heartbeat", "MlflowCallback", "RunLogger", "Spool", "TrackingUnavailable",
    "TrackingWarning", "check_reachable", "close_open_children", "describe",
    "download_checkpoint", "end_stale_runs", "ensure_experiment", "finished_hashes",
    "flush_spools", "json_artifacts", "metric_histories", "parent_runs", "per_image_metrics", "resolve_uri",
    "runs_page", "search_runs", "source_tags", "spool_path", "spool_root", "start_run",
]
