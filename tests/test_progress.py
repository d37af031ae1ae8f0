"""Quiet by default (semiseg.distributed.progress.ray_output), against Ray's real logger and its
real error-message printer, without starting Ray: the token notice, the raylet's worker-count
warning and Tune's configuration box are hidden unless verbose, other Ray messages still show,
and everything is as it was after."""

from __future__ import annotations

import logging
import os

import pytest
import ray._private.worker as ray_worker
from ray._private.authentication import authentication_token_setup

from semiseg.distributed.progress import TOKEN_NOTICE_LOGGER, ray_output

WORKER_COUNT = ("WARNING: 8 PYTHON worker processes have been started on node: ab12 with address: "
                "127.0.0.1, which is 4x the maximum expected startup concurrency (2).")
OOM = "Task was killed due to the node running low on memory ({})."


def _raylet_says(*lines: str) -> None:
    """What Ray's driver-side error listener does with a message from the raylet."""
    ray_worker.print_to_stdstream({"lines": list(lines), "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_output_hides_ray_noise_unless_verbose(verbose: bool, capsys, caplog,
                                                   monkeypatch) -> None:
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    printer, level = ray_worker.print_to_stdstream, logging.getLogger(TOKEN_NOTICE_LOGGER).level
    caplog.set_level(logging.WARNING)
    # Ray drops a line like one it printed seconds ago (RAY_DEDUP_LOGS; numbers do not count).
    oom = OOM.format("verbose" if verbose else "quiet")
    with ray_output(verbose):
        authentication_token_setup._warn_token_auth_enabled()  # what ray.init says locally
        _raylet_says(WORKER_COUNT, oom)
        tune_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    printed = capsys.readouterr().out
    token_notice = any("Token authentication" in r.getMessage() for r in caplog.records)
    assert oom in printed  # Ray's other messages always show
    assert token_notice is verbose
    assert ("PYTHON worker processes" in printed) is verbose
    # Tune's legacy output engine prints no configuration box at verbose=0.
    assert tune_output == (None if verbose else "0")
    assert ray_worker.print_to_stdstream is printer
    assert logging.getLogger(TOKEN_NOTICE_LOGGER).level == level
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ


def test_ray_output_restores_on_error(monkeypatch) -> None:
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    printer = ray_worker.print_to_stdstream
    with pytest.raises(RuntimeError), ray_output(False):
        raise RuntimeError("a trial failed")
    assert ray_worker.print_to_stdstream is printer and os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


def test_train_and_sweep_take_verbose() -> None:
    from semiseg.cli import _parser

    for command in ("train", "sweep"):
        assert _parser().parse_args([command, "x.yaml", "--verbose"]).verbose is True
        assert _parser().parse_args([command, "x.yaml", "train.epochs=2"]).verbose is False
