"""nnU-Net datasets in a sweep's grid. The nnU-Net v2 fixture dataset's real sweep (local Ray
head, a Tune trial, MLflow, labels counted by case, per-case 3D Dice against a count by hand) is
the job of test_ray_job.py (`ray job submit ... semiseg sweep`): its own sweep here cost one more
Tune trial and TorchTrainer fit (about 25 s of fixed Ray overhead, docs/BENCHMARKS.md, P1-cpu)."""

from __future__ import annotations

import pytest

from semiseg.config import load_config
from semiseg.distributed.tune import expand_grid
from semiseg.errors import ConfigError

pytestmark = pytest.mark.integration


def test_labeled_cases_sweep_trains_one_split() -> None:
    grid = load_config(None, ["data.labeled_cases=3", "sweep.label_fractions=[0.1,0.5]"])
    with pytest.raises(ConfigError, match="would train one split several times"):
        expand_grid(grid)
    full = load_config(None, ["data.labeled_cases=3", "sweep.label_fractions=[0.1]",
                              "sweep.full_supervision=true"])
    # the full-supervision upper bound labels every case, not data.labeled_cases
    assert sorted(t["data"]["labeled_cases"] for t in expand_grid(full)) == [0, 3]
