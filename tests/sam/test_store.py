"""The pseudo-label store: atomic writes, resume bookkeeping, manifest, Dice before/after."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semiseg.errors import SemisegError
from semiseg.sam.store import PseudoLabelStore, image_dice, read_manifest

CLASSES = ["background", "lung", "heart"]


def test_write_row_and_manifest(tmp_path: Path) -> None:
    store = PseudoLabelStore(tmp_path / "out", CLASSES)
    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[:4] = 1
    coarse = np.zeros_like(truth)
    coarse[:2] = 1
    row = store.write(3, "case/03", truth.copy(), {1: 0.8}, coarse, truth)
    assert row["dice_before"] == pytest.approx(2 * 16 / (16 + 32)) and row["dice_after"] == 1.0
    assert row["sam_iou/lung"] == 0.8 and math.isnan(row["sam_iou/heart"])
    assert math.isnan(row["dice_after/heart"])  # absent from both maps: no score, not 0 or 1
    assert row["classes"] == "lung"
    assert store.done() == {3}
    mask = np.array(Image.open(row["path"]))
    assert np.array_equal(mask, truth) and Path(row["path"]).name == "000003_case_03.png"
    frame = read_manifest(store.write_manifest())
    assert frame["index"].tolist() == [3]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_a_mask_without_row_is_not_done(tmp_path: Path) -> None:
    store = PseudoLabelStore(tmp_path, CLASSES)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / "000001_a.png")
    assert store.done() == set()


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(SemisegError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.parquet").write_bytes(b"garbage")
    with pytest.raises(SemisegError, match="cannot read pseudo-label manifest"):
        read_manifest(tmp_path)
    pd.DataFrame({"index": [0], "image_id": ["a"], "path": [str(tmp_path / "gone.png")]}).to_parquet(
        tmp_path / "manifest.parquet")
    with pytest.raises(SemisegError, match="1 pseudo-label masks are missing.*gone.png"):
        read_manifest(tmp_path)


def test_image_dice() -> None:
    pred = np.array([[1, 1, 0, 2]])
    truth = np.array([[1, 0, 0, 0]])
    scores = image_dice(pred, truth, 4)
    assert scores[0] == pytest.approx(2 / 3) and scores[1] == 0.0 and math.isnan(scores[2])


def test_a_folder_made_by_another_model_is_not_resumed(tmp_path: Path) -> None:
    PseudoLabelStore(tmp_path, CLASSES).claim({"coarse_sha256": "aaa", "seed": 0})
    PseudoLabelStore(tmp_path, CLASSES).claim({"coarse_sha256": "aaa", "seed": 0})  # same: resumes
    with pytest.raises(SemisegError, match="different coarse_sha256; use another output folder"):
        PseudoLabelStore(tmp_path, CLASSES).claim({"coarse_sha256": "bbb", "seed": 0})


def test_row_records_both_sizes_the_gate_and_sams_own_dice(tmp_path: Path) -> None:
    store = PseudoLabelStore(tmp_path, CLASSES)
    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[:4] = 1
    sam = np.zeros_like(truth)
    sam[:2] = 1  # SAM's own map: half the lung
    row = store.write(0, "a", truth, {1: 0.9}, truth, truth, sam=sam, agreement=np.array([np.nan, 0.5, np.nan]),
                      used=[], native_shape=(32, 40))
    assert (row["image_height"], row["image_width"], row["native_height"], row["native_width"]) == (8, 8, 32, 40)
    assert row["sam_used/lung"] == 0.0 and row["sam_used/heart"] == 0.0 and row["agreement/lung"] == 0.5
    assert row["dice_sam/lung"] == pytest.approx(2 * 16 / 48) and row["dice_after/lung"] == 1.0
    (tmp_path / "gate" / ".gate.json.7.tmp").write_text("{")  # a kill mid-write of the decision
    assert store.remove_stale_temp_files() == 1 and store.read_gate() is None
    frame = read_manifest(store.write_manifest())
    assert frame.loc[0, "native_width"] == 40
