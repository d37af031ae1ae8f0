"""Confidence-threshold pseudo-labelling (Lee 2013; FixMatch-style weak-to-strong, Sohn et al.
2020), the prediction-based self-training that Seibold et al. 2022 argue suffers confirmation
bias: the reference-guided method must beat it.

The current model predicts the weak view of each unlabeled image without gradient; pixels whose
max probability is at least `threshold` become hard pseudo-labels that supervise the model's
prediction on the strong view of the same pixels.

Hyperparameters (FixMatch defaults):
- threshold = 0.95: confidence threshold tau.
- unlabeled_weight = 1.0: weight lambda_u of the pseudo-label loss.
- rampup_steps = 200: sigmoid ramp-up of that weight, so an untrained model's guesses
  do not dominate the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from semiseg.methods.base import Batch
from semiseg.methods.common import WeakToStrongSelfTraining, confidence_mask
from semiseg.methods.registry import register_method


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.95
    """Minimum max-probability for a pixel to become a pseudo-label."""
    unlabeled_weight: float = 1.0
    """Weight of the pseudo-label cross-entropy."""
    rampup_steps: int = 200
    """Steps of the sigmoid ramp-up of unlabeled_weight."""


@register_method(__name__)
class PseudoLabel(WeakToStrongSelfTraining):
    """Confidence-thresholded pseudo-labels from the weak view supervise the strong view."""

    Config = PseudoLabelConfig

    def pseudo_labels(self, unlabeled: Batch) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            probs = self.model(unlabeled.image).float().softmax(1)
        _, label, used = confidence_mask(probs, self.cfg.threshold)
        return label, used
