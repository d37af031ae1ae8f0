"""The coarse model of the SAM chain: a U-Net checkpoint written by the engine, loaded for
inference (the model selected on val when the checkpoint has one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg.checkpoint_io import CHECKPOINT_FILE, mismatch_summary, read_weights_only
from semiseg.config import ModelConfig
from semiseg.errors import SemisegError
from semiseg.models import create_model, model_options


def checkpoint_file(path: str | Path) -> Path:
    """`checkpoint.pt`, the folder that holds it, or a Ray Train run folder (its newest
    `checkpoint_*/`), resolved and checked."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        ray_checkpoints = sorted(path.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))  # names sort by time
        path = path / CHECKPOINT_FILE if (path / CHECKPOINT_FILE).exists() or not ray_checkpoints \
            else ray_checkpoints[-1]
    if not path.is_file():
        raise SemisegError(f"coarse model checkpoint not found: {path} (sam.coarse_checkpoint or --checkpoint)")
    return path


def load_coarse_model(path: str | Path, model_cfg: ModelConfig, num_classes: int,
                      device: torch.device | str = "cpu", in_channels: int = 1) -> nn.Module:
    file = checkpoint_file(path)
    state = read_weights_only(file, "coarse model checkpoint")
    weights = state.get("best_model") or state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise SemisegError(f"{file}: not a semiseg training checkpoint (no 'model' weights)")
    model = create_model(model_cfg.name, in_channels, num_classes, model_cfg.base_channels,
                         model_cfg.depth, **model_options(weights))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise SemisegError(f"{file} was trained with a different model than model.{model_cfg.name} "
                           f"(base_channels={model_cfg.base_channels}, depth={model_cfg.depth}, "
                           f"{num_classes} classes): {mismatch_summary(exc, 200)}") from None
    return model.to(device).eval()


@torch.no_grad()
def predict_labels(model: nn.Module, images: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, H, W) label maps of normalised (N, H, W) images."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None].to(device)
    return model(x).argmax(1).cpu().numpy().astype(np.uint8)
