"""What keeps a trial's fixed overhead down (docs/BENCHMARKS.md, P1-cpu), without starting Ray:
the live lines of a trial run without Tune come from its real SQLite MLflow run, each epoch once;
the Ray Train settings are only defaults, for the duration of a fit, and a user's value wins."""

from __future__ import annotations

import io
import os
import socket

import pytest

from semiseg import tracking
from semiseg.distributed import train
from semiseg.distributed.cluster import LOCAL_RAY_ENV, runtime_env
from semiseg.distributed.progress import TrialProgress

TRIAL = {"method": {"name": "supervised"}, "data": {"label_fraction": 0.05}, "train": {"seed": 0}}


def test_trial_progress_shows_each_logged_epoch_once_then_the_end(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "unit"), "r", "trial")
    logger = tracking.RunLogger(uri, run_id)
    out = io.StringIO()
    progress = TrialProgress(TRIAL, epochs=3, uri=uri, interval_s=0.05, stream=out)
    progress.watch(run_id)
    logger.log_metrics({"val/dice_mean": 0.25, "train/loss": 1.0}, step=0)
    logger.log_metrics({"val/dice_mean": 0.5}, step=1)
    progress._show_new_epochs()  # what the thread does each tick; a second look adds nothing
    progress._show_new_epochs()
    logger.log_metrics({"val/dice_mean": 0.4}, step=2)  # logged just before the end
    progress.stop(failed=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[0 done, 1 running, 0 pending] started supervised f=0.05 seed=0"
    assert [line.split("] ", 1)[1].split(" |")[0] for line in lines[1:4]] == [
        f"supervised f=0.05 seed=0 epoch {e}/3 val dice {d}" for e, d in ((1, "0.250"), (2, "0.500"),
                                                                           (3, "0.400"))]
    assert lines[3].endswith("| supervised best val dice 0.500")
    assert lines[4].startswith("[1 done, 0 running, 0 pending] finished supervised f=0.05 seed=0")
    assert len(lines) == 5


def test_trial_progress_says_failed_and_survives_an_unreachable_server(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, no retries
    with socket.socket() as sock:  # a 127.0.0.1 port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = io.StringIO()
    progress = TrialProgress(TRIAL, epochs=2, uri=f"http://127.0.0.1:{port}", interval_s=0.05,
                             stream=out)
    progress.watch("0" * 32)  # no epoch lines and no exception: the trial spools, we wait
    progress.stop(failed=True)
    assert out.getvalue().splitlines()[-1].startswith("[0 done, 0 running, 0 pending, 1 failed] FAILED")


@pytest.mark.parametrize("user_value", [None, "3"])
def test_train_env_defaults_last_only_for_the_fit_and_a_user_value_wins(user_value, monkeypatch) -> None:
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if user_value is None:
        monkeypatch.delenv(key, raising=False)
    else:
        monkeypatch.setenv(key, user_value)
    with train._train_env():
        inside = os.environ.get(key)
    assert inside == (user_value or train.TRAIN_ENV_DEFAULTS[key])
    assert os.environ.get(key) == user_value


def test_local_ray_env_reaches_workers_and_a_user_value_wins(monkeypatch) -> None:
    (key, value), = LOCAL_RAY_ENV.items()
    monkeypatch.delenv(key, raising=False)
    env = runtime_env(LOCAL_RAY_ENV)["env_vars"]
    assert env[key] == value and "PYTHONPATH" in env
    monkeypatch.setenv(key, "1")
    assert runtime_env(LOCAL_RAY_ENV)["env_vars"][key] == "1"
    assert key not in runtime_env()["env_vars"]  # a cluster's workers keep Ray's default
