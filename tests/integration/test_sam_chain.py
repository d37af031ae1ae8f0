"""Method sam_refined as a sweep's trial runs it (`run_tracked_trial` under a parent run; the
Tune layer above it is the same for every method and tested in test_sweep.py): the generic stage
runner (semiseg.distributed.stages) runs the stages the method declares (coarse U-Net -> Ray Data
SAM refinement -> retrain on labeled + pseudo-labels) and logs them to ONE MLflow run; the model
it logged is usable by run id as a coarse model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from semiseg import tracking
from semiseg.distributed.train import run_tracked_trial
from semiseg.sam.coarse import load_coarse_model

pytestmark = pytest.mark.integration


def test_sam_refined_chain_is_one_tracked_trial(ray_local, tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config("method.name=sam_refined", "data.label_fraction=0.2",
                      "sam.model_type=tiny", "sam.batch_size=4", "sam.cpus_per_actor=0.25", "train.epochs=1",
                      "tracking.log_model=true")  # its model is read back below
    uri = tracking.resolve_uri(cfg.tracking.uri)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = tracking.start_run(uri, experiment_id, "it-sam", "sweep")
    run_tracked_trial(cfg, uri, experiment_id, parent)
    client = MlflowClient(uri)
    [run] = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "sam_refined"
    assert run.data.tags["method.evaluates"] == "student"
    # only the last stage (the retrain) logged epochs; the coarse stage trained quietly
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/dice_mean")) == [0]
    # (a random tiny SAM after one coarse epoch may get no prompt, hence no sam/sam_iou/* here)
    for key in ("sam/dice_before", "sam/dice_after", "sam/dice_after/lung", "test/dice_mean"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["sam/dice_after"] <= 1.0
    assert "pseudo/dice" in run.data.metrics  # the final training scored its fixed pseudo-labels
    rows = client.list_artifacts(run.info.run_id, "pseudolabels/round0/rows")
    assert len(rows) > 0
    for key in ("use_sam", "dice_coarse", "dice_sam", "dice_gated"):  # the gate's val decision
        assert f"sam/gate/heart/{key}" in run.data.metrics, key
    assert client.list_artifacts(run.info.run_id, "pseudolabels/round0/gate")  # gate.json
    checkpoint = tracking.download_checkpoint(uri, run.info.run_id)
    model = load_coarse_model(checkpoint, cfg.model, 4)
    assert isinstance(model, torch.nn.Module)
