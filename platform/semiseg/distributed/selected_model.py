"""The model a trial selected on val, logged by its rank-0 worker as the run's MLflow PyTorch
model (semiseg.tracking.model) when tracking.log_model is on. checkpoint.pt stays the way to
resume; this is the way to use the model.

Built from the checkpoint the engine wrote last (its `best_model` weights), not from the live
network: the checkpoint holds eager weights whatever wrapped the network in training (DDP,
torch.compile), and `semiseg.models.create_model` builds the same architecture from config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semiseg import tracking
from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.config import Config
from semiseg.data.base import SegData
from semiseg.data.splits import Split
from semiseg.sam.coarse import load_coarse_model


def log_selected_model(logger: tracking.RunLogger | None, cfg: Config, data: SegData,
                       split: Split, checkpoint_dirs: list[Path | None]) -> None:
    """Log the model of the first of `checkpoint_dirs` that holds a checkpoint (the one this fit
    wrote; the one it resumed from when a restarted worker had no epoch left to run), with two
    test images as its input example."""
    if logger is None or not cfg.tracking.log_model:
        return
    folder = next((d for d in checkpoint_dirs if d is not None and (d / CHECKPOINT_FILE).is_file()),
                  None)
    if folder is None:
        return  # nothing trained here: rank 0 of a fit that wrote no checkpoint
    model = load_coarse_model(folder, cfg.model, data.num_classes, in_channels=data.in_channels)
    example = np.asarray(data.images[split.test[:2]], dtype=np.float32)
    example = example[:, None] if example.ndim == 3 else example  # (n, C, H, W)
    logger.log_pytorch_model(model, example)
