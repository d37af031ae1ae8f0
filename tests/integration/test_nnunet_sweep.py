"""An nnU-Net v2 fixture dataset (two channels, anisotropic cases) through a real `semiseg
sweep`: local Ray, a Tune trial, MLflow, labels counted by case, and per-case 3D Dice that
matches a count by hand on the test cases' volumes.

One layout through a sweep: the Decathlon copy of the same cases differs only in the loader,
which yields the identical arrays, ids, groups, classes, channels, label unit and slice origins
(tests/data/test_nnunet.py::test_msd_layout_reads_the_same_cases, on real files); its own sweep
cost one more TorchTrainer fit (about 25 s of fixed Ray overhead, docs/BENCHMARKS.md, P1-cpu)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from semiseg import tracking
from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.distributed.tune import expand_grid, run_sweep
from semiseg.errors import ConfigError
from semiseg.report_gallery import predict

pytestmark = pytest.mark.integration


def _artifact(client: MlflowClient, run_id: str, name: str, where: Path):
    return json.loads(Path(client.download_artifacts(run_id, name, str(where))).read_text())


def test_nnunet_dataset_through_a_sweep(ray_local, tmp_path: Path, tiny_config, nnunet_dataset) -> None:
    variant = "v2"
    root = nnunet_dataset(tmp_path / variant, variant, cases=6)
    cfg = tiny_config("data.name=nnunet", f"data.root={root}", "data.image_size=16",
                      "data.labeled_cases=2",
                      "sweep.label_fractions=[0.5]", "train.epochs=1", "train.steps_per_epoch=2",
                      "tracking.overlays=1",
                      "tracking.log_model=true")  # the logged model's example is (2, 2, 16, 16)
    outcome = run_sweep(cfg, f"it-{variant}")
    client = MlflowClient(outcome.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                                f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
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


def test_labeled_cases_sweep_trains_one_split() -> None:
    grid = load_config(None, ["data.labeled_cases=3", "sweep.label_fractions=[0.1,0.5]"])
    with pytest.raises(ConfigError, match="would train one split several times"):
        expand_grid(grid)
    full = load_config(None, ["data.labeled_cases=3", "sweep.label_fractions=[0.1]",
                              "sweep.full_supervision=true"])
    # the full-supervision upper bound labels every case, not data.labeled_cases
    assert sorted(t["data"]["labeled_cases"] for t in expand_grid(full)) == [0, 3]
