"""Live pseudo-label quality: a method's pseudo-labels scored against the unlabeled images'
hidden masks, which only the engine holds. Logged per epoch as pseudo/dice and pseudo/coverage."""

from __future__ import annotations

import torch
from torch import Tensor


class PseudoLabelScore:
    """Accumulates per-class overlap on the pixels a method actually used."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.inter = torch.zeros(num_classes, dtype=torch.float64)
        self.pred = torch.zeros(num_classes, dtype=torch.float64)
        self.true = torch.zeros(num_classes, dtype=torch.float64)
        self.used = 0.0
        self.total = 0.0

    @torch.no_grad()
    def update(self, pseudo: Tensor, used: Tensor | None, hidden: Tensor) -> None:
        used = torch.ones_like(hidden, dtype=torch.bool) if used is None else used.bool()
        p, h = pseudo[used].long().cpu(), hidden[used].cpu()
        k = self.num_classes
        self.inter += torch.bincount(p[p == h], minlength=k)[:k].double()
        self.pred += torch.bincount(p, minlength=k)[:k].double()
        self.true += torch.bincount(h, minlength=k)[:k].double()
        self.used += float(used.sum())
        self.total += float(used.numel())

    def compute(self) -> dict[str, float]:
        """Mean foreground Dice over used pixels, and the fraction of pixels used; {} if unused."""
        if self.total == 0:
            return {}
        denom = self.pred[1:] + self.true[1:]
        dice = (2 * self.inter[1:] / denom.clamp(min=1))[denom > 0]
        return {
            "pseudo/dice": float(dice.mean()) if len(dice) else float("nan"),
            "pseudo/coverage": self.used / self.total,
        }
