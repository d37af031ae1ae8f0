"""`ray job submit --working-dir <fresh clone> -- semiseg sweep experiments/quickstart.yaml`
against a real local head, waited on until SUCCEEDED, then its MLflow runs checked.

The job's sweep is the nnU-Net one: an nnU-Net v2 fixture dataset (two channels, anisotropic
cases) through a real `semiseg sweep` (a Tune trial, MLflow, labels counted by case, and per-case
3D Dice that matches a count by hand on the test cases' volumes). It was a sweep of its own in
test_nnunet_sweep.py: one Tune trial and TorchTrainer fit (20-25 s of fixed start-up) fewer.

One layout through a sweep: the Decathlon copy of the same cases differs only in the loader,
which yields the identical arrays, ids, groups, classes, channels, label unit and slice origins
(tests/data/test_nnunet.py::test_msd_layout_reads_the_same_cases, on real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking
from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.report_gallery import predict

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _ray(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _submit_when_agent_is_up(args: list[str], wait_s: float = 90) -> subprocess.CompletedProcess:
    """The head's job agent starts after its ports open (later still on a loaded machine); Ray
    answers "No available agent to submit job, please try again later" until then."""
    deadline = time.time() + wait_s
    while True:
        submit = _ray(*args)
        if "No available agent" not in submit.stderr or time.time() > deadline:
            return submit
        time.sleep(2)


def _artifact(client: MlflowClient, run_id: str, name: str, where: Path):
    return json.loads(Path(client.download_artifacts(run_id, name, str(where))).read_text())


def test_ray_job_submit_from_a_fresh_clone(ray_head, tmp_path: Path, tiny_overrides, nnunet_dataset) -> None:
    clone = tmp_path / "clone"
    if (REPO / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    else:  # a source tarball: copy what git would have
        pytest.skip("not a git checkout")
    root = nnunet_dataset(tmp_path / "v2", "v2", cases=6)  # absolute, as tracking.uri's db
    db = tmp_path / "mlruns" / "mlflow.db"  # absolute: a job runs in a temp copy of its dir
    overrides = [*tiny_overrides, "data.name=nnunet", f"data.root={root}", "data.image_size=16",
                 "data.labeled_cases=2", "sweep.label_fractions=[0.5]", "train.epochs=1",
                 "train.steps_per_epoch=2", "tracking.overlays=1",
                 "tracking.log_model=true",  # the logged model's example is (2, 2, 16, 16)
                 f"tracking.uri=sqlite:///{db}", f"ray.storage_path={tmp_path / 'ray'}"]
    submit_args = ["job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
                   "--submission-id", "semiseg-it", "--working-dir", str(clone), "--",
                   "semiseg", "sweep", "experiments/quickstart.yaml", *overrides]
    submit = _submit_when_agent_is_up(submit_args)
    assert submit.returncode == 0, submit.stderr
    deadline = time.time() + 480
    while True:
        status = _ray("job", "status", "--address", ray_head.dashboard_url, "semiseg-it").stdout.upper()
        if "SUCCEEDED" in status or "FAILED" in status or time.time() > deadline:
            break
        time.sleep(3)
    logs = _ray("job", "logs", "--address", ray_head.dashboard_url, "semiseg-it").stdout
    assert "SUCCEEDED" in status, status + logs[-3000:]
    assert "test Dice" in logs
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # sweep + its trial
    (run,) = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
    (sweep,) = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "sweep"]
    assert run.data.tags[tracking.PARENT_TAG] == sweep.info.run_id
    _assert_nnunet_trial(client, run, load_config(REPO / "experiments" / "quickstart.yaml", overrides),
                         tmp_path)


def _assert_nnunet_trial(client: MlflowClient, run, cfg, tmp_path: Path) -> None:
    """What the nnU-Net sweep's one trial logged (formerly test_nnunet_sweep.py's own sweep)."""
    assert run.info.status == "FINISHED"  # a 1-channel model would fail on the first batch
    assert run.data.params["data.label_unit"] == "auto"
    for name in ("box", "bar"):
        assert 0.0 <= run.data.metrics[f"test/dice/{name}"] <= 1.0
    summary = _artifact(client, run.info.run_id, "split_summary.json", tmp_path / "s")
    assert summary["labeling"] == {"unit": "case", "labeled_groups": 2, "train_groups": 4}
    manifest = _artifact(client, run.info.run_id, "split_manifest.json", tmp_path / "m")
    roles: dict[str, set[str]] = {}
    for row in manifest:
        roles.setdefault(row["group"], set()).add(row["role"])
    assert all(len(r) == 1 for r in roles.values()) and len(roles) == 6  # whole cases
    assert sum(r == {"labeled"} for r in roles.values()) == 2
    _assert_per_case_dice_matches_a_hand_count(client, run.info.run_id, cfg, manifest, tmp_path / "c")


def _assert_per_case_dice_matches_a_hand_count(client: MlflowClient, run_id: str, cfg, manifest: list[dict],
                                               where: Path) -> None:
    """The logged per-case 3D Dice equals 2|P∩T| / (|P| + |T|) counted here over each test case's
    slices, predicted again by the trial's logged model (a class absent from both: excluded)."""
    logged = _artifact(client, run_id, tracking.PER_CASE_ARTIFACT, where)
    data = load_dataset(cfg.data)
    test = [row["index"] for row in manifest if row["role"] == "test"]
    pred = predict(tracking.download_checkpoint(client.tracking_uri, run_id), cfg.model,
                   np.asarray(data.images[test], np.float32), data.num_classes, data.in_channels)
    cases: dict[str, list[int]] = {}
    for position, index in enumerate(test):
        cases.setdefault(data.volumes.volume[index], []).append(position)
    assert sorted(row["case"] for row in logged) == sorted(cases)
    masks = np.asarray(data.masks[test])
    counted = 0
    for row in logged:
        p, t = pred[cases[row["case"]]], masks[cases[row["case"]]]
        assert row["slices"] == len(p)
        for c, name in enumerate(data.classes[1:], start=1):
            area = int((p == c).sum() + (t == c).sum())
            hand = 2 * int(((p == c) & (t == c)).sum()) / area if area else None
            assert (row[f"dice/{name}"] is None or np.isnan(row[f"dice/{name}"])) if hand is None \
                else row[f"dice/{name}"] == pytest.approx(hand, abs=1e-9), (row["case"], name)
            counted += hand is not None
    assert counted >= len(logged)  # every test case has a class to score
