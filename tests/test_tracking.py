"""The MLflow spool on a local SQLite store (the server cases are in
tests/integration/test_fault_tolerance.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking


def test_a_refused_record_is_set_aside_and_does_not_block_the_rest(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "e"), "r", "trial")
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
