"""Supervised baseline: cross-entropy + Dice on the labeled images only.

Full supervision is this method at `data.label_fraction=1.0`. It has no hyperparameters.
"""

from __future__ import annotations

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method


@register_method(__name__)
class Supervised(Method):
    """Labeled images only; unlabeled batches are ignored (and not even loaded)."""

    uses_unlabeled = False

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        loss = segmentation_loss(self.model(labeled.image), labeled.mask)
        return StepOutput(loss, {"loss_sup": loss.item()})
