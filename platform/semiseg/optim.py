"""Optimizer and learning-rate schedule from the train config."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from semiseg.config import TrainConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the peak LR at `step` of `total`."""
    t = min(step / max(total, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "poly":  # the usual semantic-segmentation schedule, power 0.9
        return (1 - t) ** 0.9
    return 1.0


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(cfg.schedule, step, total_steps)
    )
