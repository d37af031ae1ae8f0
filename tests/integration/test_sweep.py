"""A real sweep on a real local Ray: Tune trials that each run a TorchTrainer, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from semiseg import cli, tracking
from semiseg.distributed.tune import run_sweep

pytestmark = pytest.mark.integration


def _children(uri: str, parent: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quickstart")
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_sweep_logs_parent_and_child_runs(finished_sweep, tmp_path: Path, capsys) -> None:
    """The session's sweep (conftest.SHARED_SWEEP): four trials on 0.5 of the one logical GPU."""
    uri, parent = finished_sweep.outcome.uri, finished_sweep.outcome.parent_run_id
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "FINISHED"
    children = _children(uri, parent)
    assert len(children) == 4
    a, b = sorted(children, key=lambda r: r.info.start_time)[:2]
    assert b.info.start_time < a.info.end_time, "the first two 0.5-GPU trials did not overlap"
    assert {r.data.params["ray.gpus_per_worker"] for r in children} == {"0.5"}
    assert {c.data.params["data.label_fraction"] for c in children} == {"0.1", "1.0"}
    assert {c.data.params["method.name"] for c in children} == {"supervised", "pseudo_label"}
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.CONFIG_HASH_TAG] == run.data.tags[tracking.CONFIG_HASH_TAG].strip()
        assert len(run.data.tags[tracking.CONFIG_HASH_TAG]) == 16
        assert run.data.params["model.base_channels"] == "8"  # the whole resolved config
        history = client.get_metric_history(run.info.run_id, "val/dice_mean")
        assert sorted(m.step for m in history) == [0, 1]  # one value per epoch, none twice
        for name in ("lung", "heart", "spine"):
            assert 0.0 <= run.data.metrics[f"test/dice/{name}"] <= 1.0
            assert f"test/hd95/{name}" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "split_manifest.json" in artifacts and "overlays" in artifacts
        overlays = client.list_artifacts(run.info.run_id, "overlays")
        assert len(overlays) == 2 and all(a.path.endswith(".png") for a in overlays)
        manifest = json.loads(Path(client.download_artifacts(run.info.run_id, "split_manifest.json",
                                                             str(tmp_path / run.info.run_id))).read_text())
        assert {row["role"] for row in manifest} >= {"labeled", "val", "test"}
    hashes = {c.data.tags[tracking.CONFIG_HASH_TAG] for c in children}
    assert len(hashes) == 4  # method and label fraction are part of a run's identity

    # The same sweep again (on a copy of its store) trains nothing.
    copy = finished_sweep.copy_store(tmp_path / "copy")
    again = run_sweep(finished_sweep.config(f"tracking.uri={copy}"), "it-again")
    assert again.skipped == 4 and set(again.config_hashes) == hashes
    assert _children(copy, again.parent_run_id) == []
    assert MlflowClient(copy).get_run(again.parent_run_id).info.status == "FINISHED"

    # `semiseg train` always trains (it is a forced one-trial sweep), here a config that already
    # finished in that store: the sweep's supervised trial at 1.0.
    done = next(c for c in children if c.data.params["method.name"] == "supervised"
                and c.data.params["data.label_fraction"] == "1.0")
    assert cli.main(["train", str(finished_sweep.config_file), *finished_sweep.overrides(f"tracking.uri={copy}"),
                     "data.label_fraction=1.0"]) == 0
    printed = capsys.readouterr().out
    assert "1 to run" in printed and "test dice_mean" in printed, printed[-2000:]
    copy_client = MlflowClient(copy)
    runs = copy_client.search_runs(
        [copy_client.get_experiment_by_name("quickstart").experiment_id],
        f"tags.`{tracking.CONFIG_HASH_TAG}` = '{done.data.tags[tracking.CONFIG_HASH_TAG]}'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # trained again


# A trial with two DDP workers: test_mlflow_server.py's sweep (its one trial runs DDP).


def test_failed_trial_ends_failed_not_running(ray_local, tmp_path: Path, sqlite_uri: str, tiny_config) -> None:
    cfg = tiny_config("sweep.label_fractions=[0.5]", "train.lr=1e30")
    with pytest.raises(Exception, match="trials failed"):
        run_sweep(cfg, "it-fail")
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("quickstart")
    statuses = {r.data.tags.get(tracking.ROLE_TAG): r.info.status
                for r in client.search_runs([exp.experiment_id])}
    assert statuses == {"sweep": "FAILED", "trial": "FAILED"}
