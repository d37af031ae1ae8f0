"""Local contrastive loss with pseudo-label self-training (Chaitanya, Erdil, Karani &
Konukoglu, Medical Image Analysis 2023; arXiv 2112.09645).

Self-training in rounds: a frozen snapshot of the model, refreshed every `refresh_epochs`
epochs for `rounds` rounds, labels the unlabeled images. A pixel-level supervised contrastive
loss on the U-Net's decoder features pulls together pixels with the same (pseudo-)label and
pushes apart pixels of different labels, with pixels sampled per class across all images of the
batch (labeled pixels with their true labels, unlabeled pixels with pseudo-labels). As in the
paper, the segmentation loss uses the labeled images only; unlabeled images enter only through
the contrastive term.

Hyperparameters (the official code's defaults where it has them):
- temperature = 0.1 and contrastive_weight = 0.1 (official code).
- samples_per_class = 64: pixels sampled per class per step for the contrastive loss.
- refresh_epochs = 2: epochs between pseudo-label refreshes (one self-training round each).
- rounds = 5: number of refreshes; after the last, the pseudo-labeller stays fixed.
- Until the first refresh (epochs 0 .. refresh_epochs - 1) only labeled pixels are contrasted:
  the paper, too, first trains on the labeled set before pseudo-labelling.

Schedule: the paper's stage 1 trains on labeled images only, then pseudo-labels from the
best-val model are refreshed over a few rounds (about 15 000 iterations in all, official code).
Rounds are counted in epochs here, not as a fraction of the run, because refreshing happens at
epoch boundaries (`on_epoch_start`), which know the epoch but not the run's length: with
`train.epochs` E, rounds end at epoch refresh_epochs * rounds, so choose them for E. There is no
ramp-up (the paper has none; the contrastive weight is constant). The student is evaluated.

Ranges: temperature > 0; contrastive_weight >= 0; samples_per_class >= 2 (a positive pair
needs two pixels of a class); refresh_epochs >= 1; rounds >= 0 (0: labeled pixels only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import (check_range, check_weights, joint_forward, pixels,
                                    sample_per_class, unwrap)
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method


@dataclass
class LocalContrastiveConfig:
    temperature: float = 0.1
    """Temperature of the pixel contrastive loss."""
    contrastive_weight: float = 0.1
    """Weight of the contrastive loss."""
    samples_per_class: int = 64
    """Pixels sampled per class per step (across all images of the batch)."""
    refresh_epochs: int = 2
    """Epochs between pseudo-label refreshes."""
    rounds: int = 5
    """Self-training rounds (pseudo-label refreshes)."""

    def __post_init__(self) -> None:
        check_range(self, "temperature", 0, low_open=True)
        check_weights(self, "contrastive_weight")
        check_range(self, "samples_per_class", 2, integer=True)
        check_range(self, "refresh_epochs", 1, integer=True)
        check_range(self, "rounds", 0, integer=True)


def sample_per_class_pixels(features: Tensor, labels: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
    """Up to `per_class` random pixels of each class: (n, C) features and (n,) labels."""
    keep = sample_per_class(labels, per_class)
    return pixels(features)[keep], labels.reshape(-1)[keep]


def pixel_contrastive_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss over sampled pixels: for each anchor, -log of the softmax
    mass (over all other pixels) on pixels of its own label, averaged over its positives."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    has_pos = positive.any(1)
    if not has_pos.any():
        return features.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1)
    return -pos_log_prob[has_pos].mean()


@register_method(__name__)
class LocalContrastive(Method):
    """Pixel contrastive loss on decoder features with labels and refreshed pseudo-labels."""

    Config = LocalContrastiveConfig

    def __init__(self, model: nn.Module, cfg: LocalContrastiveConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        self.labeller = copy.deepcopy(unwrap(model)).requires_grad_(False)
        self.refreshes = 0

    def on_epoch_start(self, epoch: int) -> None:
        due = epoch > 0 and epoch % self.cfg.refresh_epochs == 0
        if due and self.refreshes < self.cfg.rounds:
            self.labeller.load_state_dict(unwrap(self.model).state_dict())
            self.refreshes += 1

    def pseudo_labels(self, unlabeled: Batch) -> Tensor:
        with torch.no_grad():
            self.labeller.eval()
            return self.labeller(unlabeled.image).argmax(1)

    def contrastive(self, feats: Tensor, labels: Tensor) -> Tensor:
        sampled, sampled_labels = sample_per_class_pixels(feats, labels, self.cfg.samples_per_class)
        return self.cfg.contrastive_weight * pixel_contrastive_loss(sampled, sampled_labels,
                                                                    self.cfg.temperature)

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        _, feats = self.model(unlabeled.image, return_features=True)
        return self.contrastive(feats, self.pseudo_labels(unlabeled))

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        if unlabeled is None or self.refreshes == 0:
            logits_l, feats = self.model(labeled.image, return_features=True)
            labels, pseudo = labeled.mask, None
        else:
            pseudo = self.pseudo_labels(unlabeled)
            logits_l, _, feats_l, feats_u = joint_forward(self.model, labeled.image, unlabeled.image,
                                                          features=True)
            feats, labels = torch.cat([feats_l, feats_u]), torch.cat([labeled.mask, pseudo])
        loss_sup = segmentation_loss(logits_l, labeled.mask)
        loss_con = self.contrastive(feats, labels)
        return StepOutput(loss_sup + loss_con,
                          {"loss_sup": loss_sup.item(), "loss_unsup": loss_con.item(),
                           "rounds_done": float(self.refreshes)},
                          pseudo_label=pseudo)

    def state_dict(self) -> dict[str, Any]:
        return {"labeller": self.labeller.state_dict(), "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labeller.load_state_dict(state["labeller"])
        self.refreshes = int(state["refreshes"])
