"""Confidence-threshold pseudo-labelling (Lee 2013; FixMatch-style weak-to-strong, Sohn et al.
2020), the prediction-based self-training that Seibold et al. 2022 argue suffers confirmation
bias: the reference-guided method must beat it.

The current model predicts the weak view of each unlabeled image without gradient; pixels whose
max probability is at least `threshold` become hard pseudo-labels that supervise the model's
prediction on the strong view of the same pixels. With `cutmix`, the strong views are CutMixed
between unlabeled images and the pseudo-labels and confidence masks mixed with the same boxes,
as FixMatch is run for segmentation in UniMatch's code (LiheYoung/UniMatch `fixmatch.py`).

Hyperparameters:
- threshold = 0.95: confidence threshold tau (FixMatch; UniMatch's `conf_thresh` for ACDC).
- unlabeled_weight = 1.0: weight lambda_u of the pseudo-label loss (FixMatch).
- rampup_fraction = 0.0: sigmoid ramp-up of that weight over this fraction of the run. FixMatch
  and UniMatch use none (the 0.95 threshold already keeps an untrained model's unconfident
  guesses out), so neither do we by default. It replaces the earlier fixed 200 steps.
- cutmix = True, cutmix_p = 0.5: UniMatch's FixMatch applies CutMix with p = 0.5 to every
  unlabeled image. Strength now comes from CutMix because the photometric strong view is kept
  label-safe (see `semiseg.data.transforms.strong_photometric`).

Deviations: the loss is cross-entropy on the kept pixels averaged over all pixels (UniMatch
averages over non-ignored pixels, the same here since no pixel is padding); the mix partner is
the same batch rolled by one, not a second unlabeled batch (UniMatch), which saves a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from semiseg.methods.base import Batch
from semiseg.methods.common import (WeakToStrongSelfTraining, check_fractions, check_weights,
                                    confidence_mask)
from semiseg.methods.registry import register_method


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.95
    """Minimum max-probability for a pixel to become a pseudo-label, in [0, 1]."""
    unlabeled_weight: float = 1.0
    """Weight of the pseudo-label cross-entropy, >= 0."""
    rampup_fraction: float = 0.0
    """Fraction of the run over which unlabeled_weight ramps up (sigmoid), in [0, 1]."""
    cutmix: bool = True
    """CutMix the strong views between unlabeled images, mixing the pseudo-labels alike."""
    cutmix_p: float = 0.5
    """Probability that an unlabeled image gets a CutMix box, in [0, 1]."""

    def __post_init__(self) -> None:
        check_fractions(self, "threshold", "rampup_fraction", "cutmix_p")
        check_weights(self, "unlabeled_weight")


@register_method(__name__)
class PseudoLabel(WeakToStrongSelfTraining):
    """Confidence-thresholded pseudo-labels from the weak view supervise the strong view."""

    Config = PseudoLabelConfig

    def pseudo_labels(self, unlabeled: Batch) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            probs = self.model(unlabeled.image).float().softmax(1)
        _, label, used = confidence_mask(probs, self.cfg.threshold)
        return label, used
