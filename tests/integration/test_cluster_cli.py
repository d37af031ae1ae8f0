"""`semiseg sweep` and `semiseg report` as a user runs them against a real Ray head started with
`ray start --head` (fixture in conftest.py), joined through `ray.address`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "semiseg.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=480)


def test_cli_sweep_report_and_train_on_given_ray_address(ray_head, tmp_path: Path, tiny_overrides: list[str]) -> None:
    config = str(REPO / "experiments" / "quickstart.yaml")
    out = _run(["sweep", config, *tiny_overrides, f"ray.address={ray_head.gcs_address}",
                "sweep.label_fractions=[0.5]", "--name", "nightly"], cwd=tmp_path)  # one trial: the
    # grid itself is test_sweep.py's; here it is the given address, the CLI and its defaults
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "test Dice" in out.stdout and "supervised" in out.stdout
    assert "1 done, 0 running, 0 pending" in out.stdout  # live progress was shown
    # The default store is an absolute sqlite file under the working directory's mlruns/.
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    report = _run(["report", "quickstart"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("supervised"))
    assert row.count("(n=1)") == 1

    # `train` always trains, even a config that already finished in the same store (here the
    # sweep's one trial: `sweep.label_fractions=[0.5]` is `data.label_fraction=0.5`).
    train = _run(["train", config, *tiny_overrides, f"ray.address={ray_head.gcs_address}",
                  "data.label_fraction=0.5"], cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "test dice_mean" in train.stdout and "1 to run" in train.stdout
