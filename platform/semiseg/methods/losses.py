"""Loss functions shared by methods: plain functions, not hook objects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Mean over foreground classes of 1 - soft Dice, on softmax probabilities."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[1:].mean() if num_classes > 1 else 1.0 - dice.mean()


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy + soft Dice, the usual supervised loss for medical segmentation."""
    return F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target)
