"""Loading the coarse U-Net for the SAM chain: clear errors for a missing, corrupt or foreign checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import ModelConfig
from semiseg.errors import SemisegError
from semiseg.models import create_model
from semiseg.sam.coarse import checkpoint_file, load_coarse_model, predict_labels

SMALL = ModelConfig(base_channels=4, depth=2)


def save_engine_checkpoint(folder: Path, cfg: ModelConfig, num_classes: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = create_model(cfg.name, 1, num_classes, cfg.base_channels, cfg.depth)
    torch.save({"model": model.state_dict(), "best_model": model.state_dict()}, folder / "checkpoint.pt")
    return folder


def test_loads_the_folder_or_the_file(tmp_path: Path) -> None:
    folder = save_engine_checkpoint(tmp_path / "run", SMALL, 4)
    for path in (folder, folder / "checkpoint.pt"):
        model = load_coarse_model(path, SMALL, 4)
        labels = predict_labels(model, np.zeros((2, 16, 16), np.float32))
        assert labels.shape == (2, 16, 16) and labels.max() < 4


def test_ray_train_run_folder_gives_its_newest_checkpoint(tmp_path: Path) -> None:
    save_engine_checkpoint(tmp_path / "checkpoint_2026-01-01_10-00-00.000001", SMALL, 4)
    newest = save_engine_checkpoint(tmp_path / "checkpoint_2026-01-01_10-00-05.000001", SMALL, 4)
    assert checkpoint_file(tmp_path) == newest / "checkpoint.pt"


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(SemisegError, match=f"coarse model checkpoint not found: {tmp_path}"):
        load_coarse_model(tmp_path, SMALL, 4)


def test_corrupt(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SemisegError, match="cannot read coarse model checkpoint"):
        load_coarse_model(tmp_path, SMALL, 4)


def test_different_model(tmp_path: Path) -> None:
    save_engine_checkpoint(tmp_path, ModelConfig(base_channels=8, depth=2), 4)
    with pytest.raises(SemisegError, match="trained with a different model.*base_channels=4"):
        load_coarse_model(tmp_path, SMALL, 4)


def test_not_a_training_checkpoint(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "checkpoint.pt")
    with pytest.raises(SemisegError, match="not a semiseg training checkpoint"):
        load_coarse_model(tmp_path, SMALL, 4)
