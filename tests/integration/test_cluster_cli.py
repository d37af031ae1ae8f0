"""`semiseg sweep` and `semiseg report` as a user runs them against a real Ray head started with
`ray start --head`, joined through `ray.address`. The head is stopped by its own process group,
never by `ray stop` (which would kill every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    port = _free_port()
    # Ray's socket paths must stay under ~107 characters, so not under pytest's long tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", "--block",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"ray head did not listen on port {port}")
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "semiseg.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=480)


def test_cli_sweep_on_given_ray_address(ray_head: str, tmp_path: Path, tiny_overrides: list[str]) -> None:
    config = str(REPO / "experiments" / "quickstart.yaml")
    out = _run(["sweep", config, *tiny_overrides, f"ray.address={ray_head}",
                "sweep.label_fractions=[0.1,1.0]", "--name", "nightly"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "test Dice" in out.stdout and "supervised" in out.stdout
    assert "2 done, 0 running, 0 pending" in out.stdout  # live progress was shown
    # The default store is an absolute sqlite file under the working directory's mlruns/.
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    report = _run(["report", "quickstart"], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("supervised"))
    assert row.count("(n=1)") == 2
