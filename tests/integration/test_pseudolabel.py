"""`semiseg pseudolabel` on a real local Ray, the Ray Data pipeline with a tiny random SAM built
from segment_anything's modules: a run killed partway (SIGKILL to the driver's process group)
leaves only complete files, and the rerun refines just the missing images, cleans the temp files
and writes the full manifest. One test, to keep CI short."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.engine import build_trainer, fit

pytestmark = pytest.mark.integration
OVERRIDES = ["data.image_size=32", "data.num_images=40", "data.batch_size=4", "model.base_channels=4",
             "model.depth=2", "train.epochs=1", "train.steps_per_epoch=4", "train.device=cpu",
             "sam.model_type=tiny", "sam.batch_size=2", "sam.cpus_per_actor=0.25"]


@pytest.fixture
def coarse(tmp_path: Path):
    """A real coarse U-Net checkpoint from one short epoch of the engine."""
    cfg = load_config(None, OVERRIDES)
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    fit(build_trainer(cfg, data, split, torch.device("cpu")), tmp_path / "coarse")
    return cfg, split, tmp_path / "coarse"


def assert_complete_files(out: Path, expected: set[int]) -> None:
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    assert {r["index"] for r in rows} == expected
    for row in rows:
        assert np.array(Image.open(row["path"])).shape == (32, 32)
    for mask in (out / "masks").glob("*.png"):
        Image.open(mask).load()  # every mask under a final name decodes


def _settled_rows(out: Path) -> set[int]:
    """The indices done, once no writer is left to add one."""
    before: set[int] = set()
    while True:
        done = {int(p.name[:6]) for p in (out / "rows").glob("*.json")}
        if done == before:
            return done
        before = done
        time.sleep(1)


def test_killed_run_resumes_without_partial_files(ray_local, ray_head, coarse, tmp_path: Path) -> None:
    from semiseg.distributed.pseudolabel import run_pseudolabel

    cfg, split, checkpoint = coarse
    out = tmp_path / "pl"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # The killed driver joins the session's Ray head (no Ray start of its own to wait for); its
    # Ray Data actors die with it, and _settled_rows waits until none writes any more.
    driver = subprocess.Popen(
        [sys.executable, "-m", "semiseg.cli", "pseudolabel", str(config), *OVERRIDES,
         f"ray.address={ray_head.gcs_address}", f"--checkpoint={checkpoint}", f"--output={out}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(list((out / "rows").glob("*.json"))) < 4:
            assert driver.poll() is None, "pseudolabel ended before it could be killed"
            assert time.time() < deadline, "no rows written in 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = _settled_rows(out)
    assert 4 <= len(done_before) < len(split.unlabeled), "the kill came too late to test resuming"
    assert_complete_files(out, done_before)
    (out / "masks" / ".000000_x.png.1.tmp").write_bytes(b"\x89PNG half")  # as a kill mid-write leaves

    rerun = run_pseudolabel(cfg, str(checkpoint), str(out))
    assert rerun.skipped == len(done_before) and rerun.refined == len(split.unlabeled) - len(done_before)
    assert_complete_files(out, set(split.unlabeled))
    assert not list(out.rglob("*.tmp"))
    manifest = pd.read_parquet(rerun.manifest)
    assert sorted(manifest["index"]) == sorted(split.unlabeled)
    for column in ("path", "classes", "sam_iou/lung", "dice_before", "dice_after", "dice_after/heart"):
        assert column in manifest.columns
    assert manifest["dice_before"].between(0, 1).all()
    again = run_pseudolabel(cfg, str(checkpoint), str(out))  # everything already done: no Ray work
    assert again.refined == 0 and again.skipped == len(split.unlabeled)
