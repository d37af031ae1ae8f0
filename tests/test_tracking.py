"""The tracking package on a real local SQLite store: RunLogger, its spool, MlflowCallback and
the per-image query. An unreachable store is a closed 127.0.0.1 port (the server cases, a
server killed and restarted mid-run, are in tests/integration/test_fault_tolerance.py)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking
from semiseg.engine import FitResult


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One SQLite store and experiment per module (creating the tables takes ~1 s); each test
    makes its own runs in it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # absolute, as resolve_uri makes it
    return uri, tracking.ensure_experiment(uri, "unit")


@pytest.fixture
def new_run(store: tuple[str, str]):
    def make(name: str = "r") -> str:
        return tracking.start_run(store[0], store[1], name, "trial")
    return make


@pytest.fixture
def unreachable_uri(monkeypatch: pytest.MonkeyPatch) -> str:
    """An http URI nothing listens on. No retries, so each refused call takes milliseconds;
    setting all three variables also keeps RunLogger's defaults out of the other tests."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _artifact(uri: str, run_id: str, path: str, tmp: Path) -> str:
    return Path(MlflowClient(uri).download_artifacts(run_id, path, str(tmp))).read_text()


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_run_logger_logs_params_tags_metrics_artifacts_and_status(store, new_run, tmp_path) -> None:
    uri, run_id = store[0], new_run()
    logger = tracking.RunLogger(uri, run_id, tmp_path / "spool.jsonl")
    many = {f"p{i:03d}": i for i in range(150)}  # more than MLflow's 100 params per batch
    logger.log_params({"method.name": "mean_teacher", "sweep.seeds": [0, 1], "m": {"k": 2}, **many})
    logger.set_tags({"dataset": "toy", "seed": 3})
    for step in range(3):
        logger.log_metrics({"loss": 1.0 / (step + 1), "dice": float("nan"), "note": "x"}, step=step)
    logger.log_dict({"train": ["a", "b"]}, "split_manifest.json")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "case1.png").write_bytes(b"png")
    logger.log_files(tmp_path / "pngs", "overlays")
    assert logger.logged_steps("loss") == {0, 1, 2}
    assert logger.logged_steps("never_logged") == set()
    assert logger.end("FAILED", wait_s=0) == []

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["method.name"] == "mean_teacher"
    assert json.loads(run.data.params["sweep.seeds"]) == [0, 1]
    assert json.loads(run.data.params["m"]) == {"k": 2}
    assert run.data.params["p149"] == "149" and len(run.data.params) == 153
    assert run.data.tags["dataset"] == "toy" and run.data.tags["seed"] == "3"
    assert _history(uri, run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert "dice" not in run.data.metrics and "note" not in run.data.metrics  # NaN, non-numbers
    assert json.loads(_artifact(uri, run_id, "split_manifest.json", tmp_path)) == {"train": ["a", "b"]}
    assert _artifact(uri, run_id, "overlays/case1.png", tmp_path) == "png"
    assert not (tmp_path / "spool.jsonl").exists()  # a reachable store spools nothing


def test_unreachable_store_spools_in_order_and_the_next_logger_replays_it(
        store, new_run, unreachable_uri, tmp_path) -> None:
    uri, run_id = store[0], new_run()
    spool = tracking.spool_path(str(tmp_path / "ray"), "trial-x", "rank0")
    down = tracking.RunLogger(unreachable_uri, run_id, spool)
    with pytest.warns(tracking.TrackingWarning, match="unreachable") as caught:
        down.log_params({"a": 1})
        down.set_tags({"t": "v"})
        down.log_metrics({"loss": 0.9}, step=0)
        down.log_metrics({"loss": 0.7}, step=1)
        down.log_dict({"k": 1}, "d.json")
        overlays = tmp_path / "overlays"
        overlays.mkdir()
        (overlays / "x.png").write_bytes(b"img")
        down.log_files(overlays, "overlays")
    assert len(caught) == 1  # warned once, not per record
    (overlays / "x.png").unlink()  # the spool keeps its own copy of a temp folder
    ops = [r["op"] for r in tracking.Spool(spool).records()]
    assert ops == ["params", "tags", "metrics", "metrics", "dict", "files"]
    assert down.logged_steps("loss") == {0, 1}  # spooled steps count, the server is not asked
    with pytest.warns(tracking.TrackingWarning, match="6 records NOT logged") as caught:
        left = down.close(wait_s=0)
    assert "metrics step 1: loss" in left and str(spool) in str(caught[0].message)
    assert MlflowClient(uri).get_run(run_id).data.params == {}

    # A restarted worker takes over the spool: its first call that gets through sends the
    # spooled records first, in order, then its own.
    up = tracking.RunLogger(uri, run_id, spool)
    up.log_metrics({"loss": 0.5}, step=2)
    assert not spool.exists() and _history(uri, run_id, "loss")[:2] == [(0, 0.9), (1, 0.7)]
    assert up.end("FINISHED", wait_s=0) == []
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1"} and run.data.tags["t"] == "v"
    assert _history(uri, run_id, "loss") == [(0, 0.9), (1, 0.7), (2, 0.5)]
    assert json.loads(_artifact(uri, run_id, "d.json", tmp_path)) == {"k": 1}
    assert _artifact(uri, run_id, "overlays/x.png", tmp_path) == "img"
    assert not spool.exists() and not spool.with_suffix(".files").exists()


def test_a_refused_record_is_set_aside_and_does_not_block_the_rest(store, new_run, tmp_path) -> None:
    uri, run_id = store[0], new_run()
    spool = tracking.Spool(tmp_path / "ray" / "t" / "mlflow_spool.rank0.jsonl")
    unknown_run = {"uri": uri, "run_id": "0" * 32, "op": "metrics",
                   "data": {"step": 0, "time": 1, "values": {"m": 1.0}}}
    spool.append(unknown_run)
    spool.append({**unknown_run, "run_id": run_id})
    with pytest.warns(tracking.TrackingWarning, match="refused a spooled record"):
        assert tracking.flush_spools(str(tmp_path / "ray")) == []
    assert [m.value for m in MlflowClient(uri).get_metric_history(run_id, "m")] == [1.0]
    assert spool.records() == []
    rejected = tracking.Spool(spool.path.with_name("rejected." + spool.path.name)).records()
    assert [r["run_id"] for r in rejected] == ["0" * 32]


def _result(per_image: list | None = None) -> FitResult:
    result = FitResult(best_epoch=1, best_val_dice=0.8, test_metrics={"test/dice_mean": 0.75})
    result.per_image = per_image  # set whether or not this engine declares the field
    return result


def test_callback_skips_epochs_the_run_has_and_logs_the_test_once(store, new_run, tmp_path) -> None:
    uri, run_id = store[0], new_run()
    spool = tmp_path / "spool.jsonl"
    first = tracking.MlflowCallback(tracking.RunLogger(uri, run_id, spool))
    for epoch in (0, 1):
        first.on_epoch_end(epoch, {"epoch": epoch, "loss": 1.0 - epoch / 10}, None)
    # A worker restarted from the epoch-0 checkpoint runs epoch 1 again.
    logger = tracking.RunLogger(uri, run_id, spool)
    again = tracking.MlflowCallback(logger, logger.logged_steps("epoch"))
    assert again.skip_epochs == {0, 1}
    for epoch in (1, 2):
        again.on_epoch_end(epoch, {"epoch": epoch, "loss": 5.0}, None)
    again.on_fit_end(_result())
    again.on_fit_end(_result())  # a restart after the test metrics were logged
    assert _history(uri, run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 5.0)]
    assert _history(uri, run_id, "best_epoch") == [(0, 1.0)]
    assert MlflowClient(uri).get_run(run_id).data.metrics["test/dice_mean"] == 0.75
    names = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert tracking.PER_IMAGE_ARTIFACT not in names and "overlays" not in names  # none given


def test_per_image_metrics_round_trip_through_the_callback(store, new_run) -> None:
    uri = store[0]
    with_rows, without, empty = new_run("a"), new_run("b"), new_run("c")
    per_image = [{"id": "case_07", "dice/lung": np.float32(0.5), "dice/heart": 0.25},
                 {"id": "case_09", "dice/lung": 1.0, "dice/heart": float("nan")}]
    tracking.MlflowCallback(tracking.RunLogger(uri, with_rows)).on_fit_end(_result(per_image))
    tracking.MlflowCallback(tracking.RunLogger(uri, without)).on_fit_end(_result(None))
    tracking.MlflowCallback(tracking.RunLogger(uri, empty)).on_fit_end(_result([]))

    frame = tracking.per_image_metrics(uri, [with_rows, without, empty])
    assert list(frame.columns) == ["run_id", "id", "dice/lung", "dice/heart"]
    assert frame["run_id"].tolist() == [with_rows, with_rows]
    assert frame["id"].tolist() == ["case_07", "case_09"]
    assert frame["dice/lung"].tolist() == [0.5, 1.0]
    assert frame["dice/heart"].iloc[0] == 0.25 and math.isnan(frame["dice/heart"].iloc[1])
    none = tracking.per_image_metrics(uri, [without, empty])
    assert none.empty and list(none.columns) == ["run_id", "id"]


def test_per_case_table_of_a_volume_dataset_is_logged_as_an_artifact(store, new_run, tmp_path) -> None:
    uri, run_id = store[0], new_run()
    result = _result()
    result.per_case = [{"case": "patient003_frame01", "slices": 10, "spacing_mm": [10.0, 1.5, 1.5],
                        "dice/lv": np.float64(0.9), "hd95/lv": 4.5, "dice/rv": float("nan")}]
    tracking.MlflowCallback(tracking.RunLogger(uri, run_id)).on_fit_end(result)
    rows = json.loads(_artifact(uri, run_id, tracking.PER_CASE_ARTIFACT, tmp_path))
    assert rows == [{"case": "patient003_frame01", "slices": 10, "spacing_mm": [10.0, 1.5, 1.5],
                     "dice/lv": 0.9, "hd95/lv": 4.5, "dice/rv": None}]


def test_per_image_that_is_not_a_list_of_dicts_is_named_and_not_logged() -> None:
    with pytest.warns(tracking.TrackingWarning, match="per_image is not a list of dicts"):
        assert tracking.callback.per_image_rows([0.5, 0.7]) == []
    rows = tracking.callback.per_image_rows([{"id": np.int64(3), "dice/x": float("inf")}])
    assert rows == [{"id": 3, "dice/x": None}] and json.dumps(rows, allow_nan=False)
