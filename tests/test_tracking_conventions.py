"""MLflow the way its users expect, on a real local SQLite store: experiments of the training
kind, source tags, dataset inputs, the selected model as an MLflow PyTorch model (through the
spool, then loaded back and registered), system metrics, and no run left RUNNING by a dead
driver. (The UI itself is checked in tests/integration/test_mlflow_ui.py, the REST view of a
real sweep in tests/integration/test_mlflow_server.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import semiseg
from semiseg import tracking
from semiseg.models import create_model
from semiseg.tracking.inputs import dataset_records
from semiseg.tracking.source import entry_point

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    return uri, tracking.ensure_experiment(uri, "conventions")


@pytest.fixture
def unreachable_uri(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_experiments_are_of_the_training_kind_unless_a_user_chose_one(store) -> None:
    uri, exp_id = store
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("made-by-an-older-semiseg")
    chosen = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.ensure_experiment(uri, "made-by-an-older-semiseg") == older
    tracking.ensure_experiment(uri, "chosen")
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_runs_name_their_source_and_a_trial_copies_its_sweeps(store) -> None:
    uri, exp_id = store
    client = MlflowClient(uri)
    sweep = tracking.start_run(uri, exp_id, "s", "sweep")
    tags = client.get_run(sweep).data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags[tracking.VERSION_TAG] == semiseg.__version__
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == head
        assert tags["mlflow.source.git.dirty"] in ("true", "false")
    # A trial (maybe on a node without the checkout) names the code of its sweep.
    client.set_tag(sweep, "mlflow.source.git.commit", "f" * 40)
    trial = tracking.start_run(uri, exp_id, "t", "trial", {"seed": "0"}, parent_run_id=sweep)
    assert client.get_run(trial).data.tags["mlflow.source.git.commit"] == "f" * 40
    assert entry_point(["/venv/bin/semiseg", "sweep", "x.yaml"]) == "semiseg sweep"
    assert entry_point(["/src/semiseg/cli.py", "report"]) == "semiseg report"
    assert entry_point(["/venv/bin/pytest", "-q"]) == "pytest"
    assert entry_point(["/venv/lib/site-packages/pytest/__main__.py"]) == "pytest"  # python -m
    assert entry_point(["-c"]) == "python"


def _manifest(labeled: int) -> list[dict]:
    roles = ["labeled"] * labeled + ["unlabeled"] * (4 - labeled) + ["val"] * 2 + ["test"] * 2
    return [{"index": i, "id": f"img{i}", "group": f"g{i // 2}", "role": r} for i, r in enumerate(roles)]


def test_dataset_inputs_train_val_test_with_digests_and_source(store, tmp_path) -> None:
    uri, exp_id = store
    run_id = tracking.start_run(uri, exp_id, "d", "trial")
    data_cfg = {"name": "folder", "root": str(tmp_path), "image_size": 32, "label_fraction": 0.25}
    tracking.RunLogger(uri, run_id).log_dataset("folder", str(tmp_path), data_cfg, _manifest(1))
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert set(by_context) == {"train", "val", "test"}
    assert {d.name for d in by_context.values()} == {"folder"}
    assert json.loads(by_context["val"].source) == {"uri": str(tmp_path)}
    assert by_context["train"].source_type == "local"
    assert json.loads(by_context["train"].profile) == {"images": 4, "groups": 2, "labeled": 1, "unlabeled": 3}
    # Another label fraction: other labeled images, the same val and test images.
    more = {r["context"]: r["digest"] for r in dataset_records(
        "folder", str(tmp_path), {**data_cfg, "label_fraction": 0.5}, _manifest(2))}
    assert more["train"] != by_context["train"].digest
    assert (more["val"], more["test"]) == (by_context["val"].digest, by_context["test"].digest)
    generated = dataset_records("synthetic", "synthetic", {"image_size": 32}, _manifest(1))[0]
    assert generated["source_type"] == "code" and "semiseg" in generated["source"]


def test_trials_logging_the_same_dataset_at_once_all_succeed(tmp_path) -> None:
    """Concurrent trials of a sweep log the same val/test datasets into one experiment; MLflow's
    lookup-then-insert races there (CI saw `UNIQUE constraint failed: datasets...`)."""
    import threading

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.ensure_experiment(uri, "race")
    data_cfg = {"name": "folder", "root": str(tmp_path), "image_size": 32, "label_fraction": 0.25}
    for attempt in range(3):
        runs = [tracking.start_run(uri, exp_id, f"r{attempt}-{i}", "trial") for i in range(6)]
        start, errors = threading.Barrier(len(runs)), []

        def log(run_id: str) -> None:
            start.wait()
            try:
                tracking.RunLogger(uri, run_id).log_dataset("folder", str(tmp_path), data_cfg,
                                                            _manifest(attempt + 1))
            except Exception as exc:  # collected: a thread's exception would be lost
                errors.append(exc)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        client = MlflowClient(uri)
        assert all(len(client.get_run(r).inputs.dataset_inputs) == 3 for r in runs)


def test_model_spooled_then_logged_loads_back_and_registers(store, unreachable_uri, tmp_path,
                                                            monkeypatch) -> None:
    uri, exp_id = store
    run_id = tracking.start_run(uri, exp_id, "unet-f0.5-s0", "trial", {"method": "supervised"})
    model = create_model("unet", 1, 3, 4, 2).eval()
    example = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    spool = tmp_path / "ray" / "trial" / "mlflow_spool.rank0.jsonl"
    with pytest.warns(tracking.TrackingWarning, match="unreachable"):
        tracking.RunLogger(unreachable_uri, run_id, spool).log_pytorch_model(model, example)
    assert [r["op"] for r in tracking.Spool(spool).records()] == ["model"]
    up = tracking.RunLogger(uri, run_id, spool)  # a restarted worker takes over the spool
    assert up.flush() and not spool.exists() and not spool.with_suffix(".files").exists()
    up.log_pytorch_model(model, example)  # and logs the model again

    client = MlflowClient(uri)
    (output,) = client.get_run(run_id).outputs.model_outputs  # logged once, not twice
    logged = client.get_logged_model(output.model_id)
    # Named after its run, minus the characters MLflow refuses in a model name.
    assert (logged.name, logged.source_run_id, logged.status.value) == ("unet-f0_5-s0", run_id, "READY")
    assert logged.tags["method"] == "supervised"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow's fluent API, this test only
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert [s.shape for s in info.signature.inputs.inputs] == [(-1, 1, 32, 32)]
    assert [s.shape for s in info.signature.outputs.inputs] == [(-1, 3, 32, 32)]
    batch = torch.rand(3, 1, 32, 32)  # another batch size than the example's
    with torch.no_grad():
        expected = model(batch)
        assert torch.allclose(mlflow.pytorch.load_model(f"models:/{logged.model_id}")(batch), expected)
        version = mlflow.register_model(f"models:/{logged.model_id}", "semiseg-unet")
        registered = mlflow.pytorch.load_model(f"models:/semiseg-unet/{version.version}")
        assert torch.allclose(registered(batch), expected)


def test_system_metrics_through_mlflows_monitor(store) -> None:
    uri, exp_id = store
    client = MlflowClient(uri)
    sampled, short = (tracking.start_run(uri, exp_id, name, "trial") for name in ("sys", "short"))
    monitor = tracking.RunLogger(uri, sampled).start_system_metrics(interval_s=0.2)
    time.sleep(1.0)
    monitor.finish()
    steps = [m.step for m in client.get_metric_history(sampled, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and steps == sorted(set(steps))  # sampled every 0.2 s, then once more
    assert "system/system_memory_usage_megabytes" in client.get_run(sampled).data.metrics
    # A trial shorter than the interval still gets one sample, when it finishes.
    tracking.RunLogger(uri, short).start_system_metrics(interval_s=60).finish()
    assert "system/cpu_utilization_percentage" in client.get_run(short).data.metrics


def _iso(seconds_ago: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(time.time() - seconds_ago, timezone.utc).isoformat()


def test_stale_sweeps_and_their_trials_end_killed_live_ones_stay(store) -> None:
    uri, exp_id = store
    client = MlflowClient(uri)
    dead = tracking.start_run(uri, exp_id, "dead", "sweep", {tracking.HEARTBEAT_TAG: _iso(120)})
    dead_trial = tracking.start_run(uri, exp_id, "dead-t", "trial", parent_run_id=dead)
    live = tracking.start_run(uri, exp_id, "live", "sweep", {tracking.HEARTBEAT_TAG: _iso(5)})
    live_trial = tracking.start_run(uri, exp_id, "live-t", "trial", parent_run_id=live)
    ended = tracking.start_run(uri, exp_id, "ended", "sweep")
    client.set_terminated(ended, "FINISHED")
    orphan = tracking.start_run(uri, exp_id, "orphan", "trial", parent_run_id=ended)

    lines = tracking.end_stale_runs(uri, "conventions", "semiseg report", stale_after_s=60)
    assert len(lines) == 3 and all("as KILLED" in line for line in lines)
    for run_id in (dead, dead_trial, orphan):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags[tracking.CLOSED_BY_TAG] == "semiseg report"
    assert "no heartbeat for 1" in client.get_run(dead).data.tags[tracking.END_REASON_TAG]
    assert dead in client.get_run(dead_trial).data.tags[tracking.END_REASON_TAG]
    assert {client.get_run(r).info.status for r in (live, live_trial)} == {"RUNNING"}
    assert tracking.end_stale_runs(uri, "conventions", "semiseg sweep", stale_after_s=60) == []
    assert tracking.end_stale_runs(uri, "no-such-experiment", "semiseg report") == []
    for run_id in (live, live_trial):
        client.set_terminated(run_id, "FINISHED")  # leave nothing RUNNING for other tests


def test_heartbeat_keeps_a_sweep_fresh_until_stopped(store) -> None:
    uri, exp_id = store
    client = MlflowClient(uri)
    sweep = tracking.start_run(uri, exp_id, "beating", "sweep", {tracking.HEARTBEAT_TAG: _iso(999)})
    beat = tracking.Heartbeat(uri, sweep, every_s=0.1)
    assert client.get_run(sweep).data.tags[tracking.HEARTBEAT_TAG] > _iso(30)  # at once
    client.set_tag(sweep, tracking.HEARTBEAT_TAG, _iso(999))
    deadline = time.time() + 10
    while client.get_run(sweep).data.tags[tracking.HEARTBEAT_TAG] < _iso(30):
        assert time.time() < deadline, "the heartbeat thread did not beat again"
        time.sleep(0.05)
    beat.stop()
    assert not beat._thread.is_alive()
    assert tracking.end_stale_runs(uri, "conventions", "semiseg sweep", stale_after_s=60) == []
    client.set_terminated(sweep, "FINISHED")


def test_semiseg_report_ends_a_dead_sweeps_runs(store, tmp_path, capsys) -> None:
    from semiseg.cli import main

    uri = store[0]
    exp_id = tracking.ensure_experiment(uri, "reported")
    dead = tracking.start_run(uri, exp_id, "dead", "sweep", {tracking.HEARTBEAT_TAG: _iso(3600)})
    # The report itself has nothing to show (no FINISHED trial): the stale sweep ends first.
    assert main(["report", "reported", "--uri", uri, "--out", str(tmp_path / "out")]) == 2
    assert "ended stale sweep run dead" in capsys.readouterr().out
    run = MlflowClient(uri).get_run(dead)
    assert run.info.status == "KILLED" and run.data.tags[tracking.CLOSED_BY_TAG] == "semiseg report"
