"""A trial's selected model as an MLflow PyTorch model (a LoggedModel linked to the run), so
`mlflow.pytorch.load_model`, the model registry and the runs table's Models column work.

Saved in MLflow's "pt2" format (`torch.export`: a traced graph, loaded without unpickling and
without semiseg's code) with a tensor signature (batch dimension free, the trained image size
fixed) and an input example of real test images. Two steps, so a RunLogger can spool between
them: `save_pytorch_model` writes the MLflow model folder locally (no server needed), and
`upload_model` creates the LoggedModel from the run, uploads the folder and links it as the
run's output, as `mlflow.pytorch.log_model` does, minus two things it does that do not fit
here: re-logging the run's step-0 metrics under the model id (would duplicate each metric's
first point) and inferring pip requirements by loading the model in a subprocess (slow; the
requirements of a pt2 model are known: torch and mlflow).
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

from semiseg.tracking.errors import TrackingWarning

# Run tags a LoggedModel carries too, so the Models tab and the registry can tell models apart.
MODEL_TAGS = ("semiseg.config_hash", "method", "dataset", "label_fraction", "seed",
              "method.evaluates", "semiseg.version", "mlflow.source.git.commit")


def _spec(shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(np.dtype(np.float32), (-1, *shape[1:]))


def save_pytorch_model(model: nn.Module, example: np.ndarray, folder: Path) -> Path:
    """Write `model` (a copy, on CPU, in eval mode) as an MLflow PyTorch model in `folder`.
    `example`: float32 images (N, C, H, W); one image is given twice, so that the batch
    dimension exports as dynamic (torch.export fixes a dimension of size 1)."""
    example = np.ascontiguousarray(example, dtype=np.float32)
    if example.ndim != 4 or len(example) == 0:
        raise ValueError(f"input example of shape {example.shape}: expected (N, C, H, W), N >= 1")
    if len(example) == 1:
        example = np.concatenate([example, example])
    cpu_model = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        output = cpu_model(torch.from_numpy(example))
    signature = ModelSignature(inputs=Schema([_spec(example.shape)]),
                               outputs=Schema([_spec(tuple(output.shape))]))
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    mlflow.pytorch.save_model(cpu_model, str(folder), signature=signature, input_example=example,
                              pip_requirements=requirements, serialization_format="pt2")
    return folder


def upload_model(client: MlflowClient, run_id: str, folder: Path, name: str = "") -> str | None:
    """Log the saved model `folder` as the run's LoggedModel `name` (default: the run's name,
    with _ for the characters MLflow refuses in a model name: / : . % " '); returns its model
    id, or None when the run already has one of that name (a restarted worker, a replayed
    spool)."""
    run = client.get_run(run_id)
    name = re.sub(r"[/:.%\"']", "_", name or run.info.run_name)
    outputs = run.outputs.model_outputs if run.outputs else []
    for output in outputs:
        if client.get_logged_model(output.model_id).name == name:
            return None
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id,
        tags={k: run.data.tags[k] for k in MODEL_TAGS if k in run.data.tags},
        params=dict(run.data.params), model_type="segmentation")
    try:
        meta = Model.load(str(folder))  # the MLmodel file names the model and run it belongs to
        meta.run_id, meta.model_id, meta.model_uuid = run_id, logged.model_id, logged.model_id
        meta.artifact_path = logged.artifact_location
        meta.save(str(Path(folder) / "MLmodel"))
        client.log_model_artifacts(logged.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


class SystemMetrics:
    """MLflow's own system-metrics monitor on this machine (CPU, memory, disk, network; GPU
    through nvidia-ml-py where a GPU is present) logging `system/...` to the run every
    interval_s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it), continuing the steps of
    an earlier monitor of the run (a restarted worker). It stops by itself once the run is no
    longer RUNNING; finish() stops it and logs one last sample, so a trial shorter than the
    interval still has its system metrics."""

    def __init__(self, uri: str, run_id: str, interval_s: float = 10.0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.run_id = run_id
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s,
                                            resume_logging=True, tracking_uri=uri)
        self.monitor.start()

    def finish(self) -> None:
        monitor = self.monitor
        monitor.finish()  # joins its thread: the last sample below cannot race it
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # metrics about the machine must never fail a trained trial
            warnings.warn(f"MLflow run {self.run_id}: the last system-metrics sample was not "
                          f"logged ({type(exc).__name__}: {str(exc)[:200]})", TrackingWarning,
                          stacklevel=2)
