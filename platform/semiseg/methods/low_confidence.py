"""Low-confidence consistency and class separation in a mean teacher (Gao & Yu, ISBP 2023,
"Semi-supervised Medical Image Segmentation with Low-Confidence Consistency and Class
Separation", doi:10.1109/ISBP57705.2023.10061306).

Easy, high-proportion pixels drown the informative ones, so only low-confidence pixels count:
pixels whose teacher max-probability is >= tau are dropped. On the remaining pixels,
- consistency: softmax-MSE between the student (strong view) and the EMA teacher (weak view);
- class separation: the student's pixel features are pulled toward the prototype of their
  teacher-assigned class and pushed from the other classes' prototypes (cross-entropy over
  cosine similarities to all prototypes, scaled by 1 / temperature). Prototypes are an EMA of
  class feature means over labeled pixels (true labels) and confident unlabeled pixels
  (teacher labels).

The teacher is a parameters-only EMA of the student whose BatchNorm statistics are its own,
from its own train-mode passes (see `ema_update`); it is what is evaluated
(`evaluates = "teacher"`), as for `mean_teacher`.

Hyperparameters (the abstract gives no values and we know of no public code; these follow the
mean-teacher settings of SSL4MIS, on which such methods build):
- threshold (tau) = 0.8, in [0, 1]: pixels with teacher confidence >= tau are dropped (ours).
- consistency_weight = 0.1 (SSL4MIS), separation_weight = 0.1 (ours): loss weights, >= 0.
- rampup_fraction = 1.0, in [0, 1]: both weights ramp up (sigmoid) over this fraction of the
  run; SSL4MIS's mean teacher ramps over its whole run (iter_num // 150 with
  consistency_rampup = 200: 30 000 of 30 000 iterations). Replaces the fixed 200 steps.
- ema_decay = 0.99, in [0, 1): teacher EMA (SSL4MIS).
- prototype_momentum = 0.9, in [0, 1): prototype EMA (ours).
- temperature = 0.1, > 0: of the class-separation softmax (ours; the usual contrastive value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import (check_decays, check_fractions, check_range, check_weights,
                                    ema_update, joint_forward, make_teacher, schedule_rampup)
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method


@dataclass
class LowConfidenceConfig:
    threshold: float = 0.8
    """tau: pixels whose teacher max-probability is >= tau leave both unlabeled losses."""
    consistency_weight: float = 0.1
    """Weight of the low-confidence consistency loss."""
    separation_weight: float = 0.1
    """Weight of the class-separation loss."""
    ema_decay: float = 0.99
    """EMA decay of the teacher weights."""
    prototype_momentum: float = 0.9
    """EMA momentum of the class prototypes."""
    temperature: float = 0.1
    """Temperature of the class-separation softmax over prototype similarities."""
    rampup_fraction: float = 1.0
    """Fraction of the run over which both unlabeled weights ramp up (sigmoid), in [0, 1]."""

    def __post_init__(self) -> None:
        check_fractions(self, "threshold", "rampup_fraction")
        check_weights(self, "consistency_weight", "separation_weight")
        check_decays(self, "ema_decay", "prototype_momentum")
        check_range(self, "temperature", 0, low_open=True)


def low_confidence_mask(teacher_probs: Tensor, threshold: float) -> Tensor:
    """True where the teacher's max probability is below tau (every pixel when tau >= 1)."""
    if threshold >= 1.0:
        return torch.ones(teacher_probs[:, 0].shape, dtype=torch.bool, device=teacher_probs.device)
    return teacher_probs.max(1).values < threshold


def class_means(features: Tensor, labels: Tensor, mask: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(K, C) mean normalised feature per class over masked pixels, and which classes had any."""
    f = F.normalize(features.detach().float(), dim=1).permute(0, 2, 3, 1)[mask]
    onehot = F.one_hot(labels[mask], num_classes).float()
    counts = onehot.sum(0)
    return onehot.T @ f / counts.clamp(min=1)[:, None], counts > 0


@register_method(__name__)
class LowConfidence(Method):
    """Mean teacher whose consistency and prototype separation use low-confidence pixels only."""

    Config = LowConfidenceConfig
    evaluates = "teacher"

    def __init__(self, model: nn.Module, cfg: LowConfidenceConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        self.teacher = make_teacher(model)
        self.prototypes: Tensor | None = None  # (K, C), set from the first batch

    def update_prototypes(self, feats: Tensor, labels: Tensor, mask: Tensor) -> None:
        means, present = class_means(feats, labels, mask, self.num_classes)
        if self.prototypes is None:
            self.prototypes = means
            return
        m = self.cfg.prototype_momentum
        self.prototypes[present] = m * self.prototypes[present] + (1 - m) * means[present]

    def unlabeled_terms(self, logits_u: Tensor, feats_u: Tensor, unlabeled: Batch,
                        step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(consistency, separation, low-confidence mask, teacher labels)."""
        with torch.no_grad():
            self.teacher.train()  # batch statistics; its own running statistics follow its weights
            t_probs = self.teacher(unlabeled.image).float().softmax(1)
        low = low_confidence_mask(t_probs, self.cfg.threshold)
        t_label = t_probs.argmax(1)
        ramp = schedule_rampup(step, self.cfg.rampup_fraction, self.total_steps)
        sq = ((logits_u.float().softmax(1) - t_probs) ** 2).sum(1)
        consistency = self.cfg.consistency_weight * ramp * (sq * low).sum() / low.numel()
        self.update_prototypes(feats_u, t_label, ~low)
        separation = feats_u.sum() * 0.0
        if self.prototypes is not None and low.any():
            z = F.normalize(feats_u.float(), dim=1).permute(0, 2, 3, 1)[low]
            sims = z @ F.normalize(self.prototypes, dim=1).T / self.cfg.temperature
            separation = self.cfg.separation_weight * ramp * F.cross_entropy(sims, t_label[low])
        return consistency, separation, low, t_label

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        logits_u, feats_u = self.model(unlabeled.strong, return_features=True)
        consistency, separation, _, _ = self.unlabeled_terms(logits_u, feats_u, unlabeled, step)
        return consistency + separation

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        if unlabeled is None:
            loss = segmentation_loss(self.model(labeled.image), labeled.mask)
            return StepOutput(loss, {"loss_sup": loss.item()})
        logits_l, logits_u, feats_l, feats_u = joint_forward(
            self.model, labeled.image, unlabeled.strong, features=True)
        self.update_prototypes(feats_l, labeled.mask, torch.ones_like(labeled.mask, dtype=torch.bool))
        loss_sup = segmentation_loss(logits_l, labeled.mask)
        consistency, separation, low, t_label = self.unlabeled_terms(logits_u, feats_u, unlabeled, step)
        return StepOutput(
            loss_sup + consistency + separation,
            {"loss_sup": loss_sup.item(), "loss_unsup": (consistency + separation).item(),
             "loss_consistency": consistency.item(), "loss_separation": separation.item(),
             "low_conf_ratio": low.float().mean().item()},
            pseudo_label=t_label, pseudo_used=low,
        )

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.teacher, self.model, self.cfg.ema_decay, step)

    def eval_model(self) -> nn.Module:
        return self.teacher

    def state_dict(self) -> dict[str, Any]:
        prototypes = None if self.prototypes is None else self.prototypes.clone()
        return {"teacher": self.teacher.state_dict(), "prototypes": prototypes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.prototypes = state["prototypes"]
