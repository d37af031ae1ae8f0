"""Run a method's stages (`Method.stages`, plain data from semiseg.methods.stages) inside one
trial. Generic: it never names a method.

    TrainStage       -> one TorchTrainer (engine.fit on each worker); output: its checkpoint
    PseudoLabelStage -> SAM refines the masks of an earlier stage's model on the unlabeled
                        images (Ray Data); output: the pseudo-label manifest

A later stage reads an earlier one's output through `TrainStage.inputs` (e.g. the manifest
becomes method param `manifest`). Only the last stage, the trial's model, reports to Tune and
logs its epochs to the trial's MLflow run, so a multi-stage trial looks like any other; each
PseudoLabelStage logs its pseudo-label quality (Dice before/after refinement against the hidden
masks, SAM's predicted IoU; with sam.gate, the gate's per-class decision and val Dice as
sam/gate/<class>/*) to the same run at step = its round, and its rows and gate as artifacts.
Outputs live under the Train storage path, so on a multi-node cluster it must be shared storage.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from semiseg.config import Config
from semiseg.distributed.cluster import storage_path
from semiseg.distributed.pseudolabel import run_pseudolabel
from semiseg.errors import SemisegError
from semiseg.methods import METHODS, PseudoLabelStage, Stage, TrainStage
from semiseg.methods.stages import resolve_inputs

Trainer = Callable[[Config, "str | None", str], Any]  # (cfg, run_id or None, train name) -> Result


def run_stages(cfg: Config, run_id: str, train_name: str, train: Trainer,
               log_metrics: Callable[[dict[str, float], int], None],
               log_files: Callable[[Path, str], None]) -> Any:
    """Run the stages of `cfg`'s method; `train` runs one TorchTrainer (reporting to the trial's
    run when given its id), the loggers write to the trial's run. Returns the last Result."""
    stages: list[Stage] = METHODS.get(cfg.method.name).stages(cfg)
    root = Path(storage_path(cfg.ray.storage_path)) / train_name
    local = Path(tempfile.mkdtemp(prefix="semiseg-stages-"))
    needed = _read_later(stages)
    outputs: dict[str, Any] = {}
    result = None
    try:
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            if isinstance(stage, TrainStage):
                name = f"{train_name}-{stage.name}" if stage.name else train_name
                result = train(_stage_config(cfg, stage, outputs), run_id if last else None, name)
                if stage.name in needed:
                    outputs[stage.name] = _local_checkpoint(result, local / stage.name)
            else:
                outputs[stage.name] = _pseudolabels(cfg, stage, outputs, root, log_metrics, log_files)
        return result
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _stage_config(cfg: Config, stage: TrainStage, outputs: dict[str, Any]) -> Config:
    stage_cfg = copy.deepcopy(cfg)
    stage_cfg.method.name, stage_cfg.method.params = stage.method, resolve_inputs(stage, outputs)
    return stage_cfg


def _pseudolabels(cfg: Config, stage: PseudoLabelStage, outputs: dict[str, Any], root: Path,
                  log_metrics: Callable[[dict[str, float], int], None],
                  log_files: Callable[[Path, str], None]) -> Path:
    outcome = run_pseudolabel(cfg, str(outputs[stage.model]), str(root / stage.name))
    gate = outcome.gate.metrics() if outcome.gate is not None else {}  # the val decision per class
    log_metrics({**pseudo_metrics(pd.read_parquet(outcome.manifest)), **gate}, stage.round)
    log_files(outcome.manifest.parent / "rows", f"pseudolabels/round{stage.round}/rows")
    if gate:
        log_files(outcome.manifest.parent / "gate", f"pseudolabels/round{stage.round}/gate")
    return outcome.manifest


def _read_later(stages: list[Stage]) -> set[str]:
    """Names of the stages whose output a later stage reads (only those are kept)."""
    reads: set[str] = set()
    for stage in stages:
        reads |= set(stage.inputs.values()) if isinstance(stage, TrainStage) else {stage.model}
    return reads


def pseudo_metrics(manifest: pd.DataFrame) -> dict[str, float]:
    """Means over images of Dice before/after refinement (and of SAM's own masks, before the
    gate), of SAM's predicted IoU, its agreement with the coarse masks and how often the gate
    used SAM's mask."""
    keys = [c for c in manifest.columns
            if c.startswith(("dice_before", "dice_after", "dice_sam", "sam_iou/", "agreement/", "sam_used/"))]
    return {f"sam/{k}": float(manifest[k].mean()) for k in keys if manifest[k].notna().any()}


def _local_checkpoint(result: Any, target: Path) -> Path:
    """A local copy of the checkpoint a finished TorchTrainer left (storage may be remote)."""
    if result is None or result.checkpoint is None:
        raise SemisegError(f"stage {target.name!r} left no checkpoint for the stages after it")
    with result.checkpoint.as_directory() as src:
        shutil.copytree(src, target)
    return target
