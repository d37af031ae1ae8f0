"""Low-confidence consistency and class separation in a mean teacher (Gao & Yu, ISBP 2023,
"Semi-supervised Medical Image Segmentation with Low-Confidence Consistency and Class
Separation", doi:10.1109/ISBP57705.2023.10061306). We know of no public code; only the abstract
is available to us, so everything the abstract leaves open is marked "ours" below.

Easy, high-proportion pixels drown the informative ones, so only low-confidence pixels count:
a pixel is low-confidence when the EMA teacher's max probability on the weak view is below
tau(t). On those pixels,
- consistency: softmax-MSE between the student (strong view) and the teacher (weak view), the
  squared difference averaged over classes, as `mean_teacher` (SSL4MIS `softmax_mse_loss`);
- class separation: the student's pixel features are pulled toward the prototype of their
  teacher-assigned class and pushed from the other classes' prototypes (cross-entropy over
  cosine similarities to all class prototypes, divided by the temperature).

The teacher is `mean_teacher`'s: a parameters-only EMA of the student whose BatchNorm statistics
are its own, from its own train-mode passes (`ema_update`); it is what is evaluated
(`evaluates = "teacher"`). With tau >= 1, consistency_norm = "all" and separation_weight = 0
the unlabeled loss is exactly `mean_teacher`'s (a unit test checks this).

Decisions the abstract leaves open (issue 12):
- Normalisation. Each unlabeled term is a sum over low-confidence pixels divided either by
  their number ("low") or by all unlabeled pixels ("all"). Default "low" for both: with "all"
  the consistency vanished as the low-confidence fraction fell to 4-6 % of pixels late in
  training (docs/RESULTS.md), i.e. the method turned itself off. "low" is what the mean-teacher
  variant that also keeps a subset of pixels does: UA-MT (Yu et al., MICCAI 2019; SSL4MIS
  `train_uncertainty_aware_mean_teacher_*.py`: sum(mask * mse) / (2 * sum(mask)), 2 classes).
  The ablation in docs/RESULTS.md ("low_confidence (issue 12)") compares the two for the
  consistency term.
- Prototypes: one EMA step per training step (momentum `prototype_momentum`) toward the
  per-class mean of L2-normalised, detached *student* decoder features over (a) every labeled
  pixel with its true label (the labeled pass) and (b) the unlabeled pixels the teacher is
  confident about (max probability >= tau(t)) with the teacher's label (strong-view features).
  A class's first mean sets its prototype. Student rather than teacher features: they are the
  space the separation loss pulls, and a teacher pass over labeled images would add labeled
  batches to the teacher's own BatchNorm statistics, which would change the mean teacher the
  method is built on.
- Threshold. A fixed tau = 0.8 left only 4-6 % of pixels by the last epoch, because the
  teacher's confidence rises with training. tau(t) therefore rises with the training progress
  t = step / total_steps: the margin 1 - tau is interpolated geometrically,
  1 - tau(t) = (1 - threshold)^(1 - t) * (1 - threshold_final)^t, since the teacher's margins
  shrink by orders of magnitude, not by steps of equal size. UA-MT likewise moves its
  (uncertainty) threshold with the training progress. threshold_final = threshold gives the
  fixed tau. tau(t) and the low-confidence fraction are logged every step (train/threshold,
  train/low_conf_ratio, per-epoch means in MLflow) and the low-confidence pixels are the
  StepOutput's used pixels (pseudo/coverage).

Hyperparameters (the abstract gives no values):
- threshold = 0.8, in [0, 1]: tau at the start of the run (ours; the earlier fixed tau).
- threshold_final = 0.99, in [threshold, 1) (1 only when threshold = 1): tau at the end of
  the run (ours). Chosen from the mean teacher's confidence on the *unlabeled training* images
  (synthetic, 5 %, seed 0, 20 x 40 steps; never val or test): from epoch 8 on, the fraction
  below 0.8 / 0.95 / 0.99 / 0.999 was 6-4 % / 13-9 % / 25-16 % / 95-82 %. A 0.99 end keeps the
  low-confidence pixels a minority, an estimated 11-16 % from epoch 5 on under this schedule,
  where a fixed 0.8 leaves 4 % and an end at 0.999 would keep 80 % (nearly mean teacher).
- consistency_weight = 0.1, >= 0: SSL4MIS's mean-teacher weight.
- separation_weight = 0.1, >= 0: ours (the same as the consistency weight).
- consistency_norm = separation_norm = "low", in {"low", "all"}: see Normalisation above.
- rampup_fraction = 1.0, in [0, 1]: both weights ramp up (sigmoid) over this fraction of the
  run, as SSL4MIS's mean teacher ramps over its whole run (see `mean_teacher`).
- ema_decay = 0.99, in [0, 1): teacher EMA (SSL4MIS).
- prototype_momentum = 0.9, in [0, 1): prototype EMA per step (ours).
- temperature = 0.1, > 0: of the class-separation softmax (ours; the usual contrastive value,
  e.g. Chaitanya et al.'s local contrastive loss).

Deviations (from what the abstract says, and from this file before issue 12):
- tau rises over training instead of staying fixed (the abstract says only "maximum probability
  values" separate low from high confidence).
- The consistency is now averaged over classes (was: summed, K times larger per pixel) and, by
  default, over low-confidence pixels only (was: over all pixels).
- Prototypes now take one EMA step per training step from labeled and confident unlabeled
  pixels together (was: two steps, one for each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import (check_decays, check_fractions, check_range, check_weights,
                                    ema_update, joint_forward, make_teacher, schedule_rampup)
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method

NORMS = ("low", "all")
"""How an unlabeled term's sum over low-confidence pixels is divided: by their number, or by all
unlabeled pixels."""


@dataclass
class LowConfidenceConfig:
    threshold: float = 0.8
    """tau at the start of the run: pixels whose teacher max-probability is >= tau are dropped."""
    threshold_final: float = 0.99
    """tau at the end of the run, >= threshold; the margin 1 - tau moves geometrically between."""
    consistency_weight: float = 0.1
    """Weight of the low-confidence consistency loss, >= 0."""
    separation_weight: float = 0.1
    """Weight of the class-separation loss, >= 0."""
    consistency_norm: str = "low"
    """Divide the consistency sum by the low-confidence pixels ("low") or all pixels ("all")."""
    separation_norm: str = "low"
    """Divide the separation sum by the low-confidence pixels ("low") or all pixels ("all")."""
    ema_decay: float = 0.99
    """EMA decay of the teacher weights, in [0, 1)."""
    prototype_momentum: float = 0.9
    """EMA momentum of the class prototypes per step, in [0, 1)."""
    temperature: float = 0.1
    """Temperature of the class-separation softmax over prototype similarities, > 0."""
    rampup_fraction: float = 1.0
    """Fraction of the run over which both unlabeled weights ramp up (sigmoid), in [0, 1]."""

    def __post_init__(self) -> None:
        check_fractions(self, "threshold", "rampup_fraction")
        # a geometric margin cannot reach 0 from above it: tau = 1 at the end only if from the start
        check_range(self, "threshold_final", self.threshold, 1, high_open=self.threshold < 1)
        check_weights(self, "consistency_weight", "separation_weight")
        check_decays(self, "ema_decay", "prototype_momentum")
        check_range(self, "temperature", 0, low_open=True)
        for key in ("consistency_norm", "separation_norm"):
            if getattr(self, key) not in NORMS:
                raise ConfigError(f"method.params.{key}={getattr(self, key)!r}: expected one of "
                                  f"{', '.join(map(repr, NORMS))}")


def threshold_at(start: float, final: float, progress: float) -> float:
    """tau at training progress t in [0, 1] (clipped): 1 - tau = (1 - start)^(1-t) (1 - final)^t."""
    t = min(max(progress, 0.0), 1.0)
    if t == 0.0 or start == final:
        return start
    if t == 1.0:
        return final
    return 1.0 - (1.0 - start) ** (1.0 - t) * (1.0 - final) ** t


def low_confidence_mask(teacher_probs: Tensor, threshold: float) -> Tensor:
    """True where the teacher's max probability is below tau (every pixel when tau >= 1)."""
    if threshold >= 1.0:
        return torch.ones(teacher_probs[:, 0].shape, dtype=torch.bool, device=teacher_probs.device)
    return teacher_probs.max(1).values < threshold


def normalised_sum(per_pixel: Tensor, low: Tensor, norm: str) -> Tensor:
    """Sum of `per_pixel` over the `low` pixels, divided by their number ("low"; 0 when there are
    none) or by all pixels ("all")."""
    total = (per_pixel * low).sum()
    if norm == "low":
        return total / low.sum().clamp(min=1)  # a tensor: no host sync on a GPU
    return total / low.numel()


def class_means(features: Tensor, labels: Tensor, mask: Tensor,
                num_classes: int) -> tuple[Tensor, Tensor]:
    """(K, C) mean normalised feature per class over masked pixels, and which classes had any."""
    f = F.normalize(features.detach().float(), dim=1).permute(0, 2, 3, 1)[mask]
    onehot = F.one_hot(labels[mask], num_classes).float()
    counts = onehot.sum(0)
    return onehot.T @ f / counts.clamp(min=1)[:, None], counts > 0


@dataclass
class UnlabeledTerms:
    """What one unlabeled batch gives: both weighted losses and the masks they used."""

    consistency: Tensor
    separation: Tensor
    low: Tensor
    """(B, H, W) bool: teacher max-probability < tau(t), the pixels both losses use."""
    teacher_label: Tensor
    threshold: float
    """tau(t) at this step."""


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
        self.seen: Tensor | None = None  # (K,) bool: classes whose prototype has been set

    def threshold(self, step: int) -> float:
        """tau(t) with t = step / total_steps."""
        return threshold_at(self.cfg.threshold, self.cfg.threshold_final,
                            step / max(self.total_steps, 1))

    def update_prototypes(self, feats: Tensor, labels: Tensor, mask: Tensor) -> None:
        """One EMA step toward this batch's class means; a class's first mean sets it."""
        means, present = class_means(feats, labels, mask, self.num_classes)
        if self.prototypes is None:
            self.prototypes, self.seen = means, present.clone()
            return
        m = self.cfg.prototype_momentum
        ema = present & self.seen
        first = present & ~self.seen
        self.prototypes[ema] = m * self.prototypes[ema] + (1 - m) * means[ema]
        self.prototypes[first] = means[first]
        self.seen |= present

    def unlabeled_terms(self, logits_u: Tensor, feats_u: Tensor, unlabeled: Batch, step: int,
                        labeled: tuple[Tensor, Tensor] | None = None) -> UnlabeledTerms:
        """Both unlabeled losses; first updates the prototypes from the confident unlabeled
        pixels plus, when given, the labeled pass's (features, labels)."""
        with torch.no_grad():
            self.teacher.train()  # batch statistics; its own running statistics follow its weights
            t_probs = self.teacher(unlabeled.image).float().softmax(1)
        tau = self.threshold(step)
        low = low_confidence_mask(t_probs, tau)
        t_label = t_probs.argmax(1)
        self._prototype_step(feats_u, t_label, ~low, labeled)
        ramp = schedule_rampup(step, self.cfg.rampup_fraction, self.total_steps)
        sq = ((logits_u.float().softmax(1) - t_probs) ** 2).mean(1)
        consistency = self.cfg.consistency_weight * ramp * normalised_sum(
            sq, low, self.cfg.consistency_norm)
        separation = self.cfg.separation_weight * ramp * normalised_sum(
            self._separation_per_pixel(feats_u, t_label), low, self.cfg.separation_norm)
        return UnlabeledTerms(consistency, separation, low, t_label, tau)

    def _prototype_step(self, feats_u: Tensor, t_label: Tensor, confident: Tensor,
                        labeled: tuple[Tensor, Tensor] | None) -> None:
        if labeled is not None:
            feats_l, mask_l = labeled
            feats_u = torch.cat([feats_l, feats_u])
            t_label = torch.cat([mask_l, t_label])
            confident = torch.cat([torch.ones_like(mask_l, dtype=torch.bool), confident])
        self.update_prototypes(feats_u, t_label, confident)

    def _separation_per_pixel(self, feats_u: Tensor, t_label: Tensor) -> Tensor:
        """(B, H, W) cross-entropy of each pixel's prototype similarities against its teacher
        label; zeros (with gradient) before any prototype exists."""
        if self.prototypes is None:
            return feats_u.sum(1) * 0.0
        z = F.normalize(feats_u.float(), dim=1)
        sims = torch.einsum("bchw,kc->bkhw", z, F.normalize(self.prototypes, dim=1))
        return F.cross_entropy(sims / self.cfg.temperature, t_label, reduction="none")

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        logits_u, feats_u = self.model(unlabeled.strong, return_features=True)
        terms = self.unlabeled_terms(logits_u, feats_u, unlabeled, step)
        return terms.consistency + terms.separation

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        if unlabeled is None:
            loss = segmentation_loss(self.model(labeled.image), labeled.mask)
            return StepOutput(loss, {"loss_sup": loss.item()})
        logits_l, logits_u, feats_l, feats_u = joint_forward(
            self.model, labeled.image, unlabeled.strong, features=True)
        loss_sup = segmentation_loss(logits_l, labeled.mask)
        terms = self.unlabeled_terms(logits_u, feats_u, unlabeled, step, (feats_l, labeled.mask))
        loss_unsup = terms.consistency + terms.separation
        return StepOutput(
            loss_sup + loss_unsup,
            {"loss_sup": loss_sup.item(), "loss_unsup": loss_unsup.item(),
             "loss_consistency": terms.consistency.item(),
             "loss_separation": terms.separation.item(),
             "low_conf_ratio": terms.low.float().mean().item(), "threshold": terms.threshold},
            pseudo_label=terms.teacher_label, pseudo_used=terms.low,
        )

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.teacher, self.model, self.cfg.ema_decay, step)

    def eval_model(self) -> nn.Module:
        return self.teacher

    def state_dict(self) -> dict[str, Any]:
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {"teacher": self.teacher.state_dict(), "prototypes": clone(self.prototypes),
                "seen": clone(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.prototypes = state["prototypes"]
        # checkpoints from before issue 12 have no "seen": every stored prototype was set
        seen = state.get("seen")
        if seen is None and self.prototypes is not None:
            seen = torch.ones(len(self.prototypes), dtype=torch.bool, device=self.prototypes.device)
        self.seen = seen
