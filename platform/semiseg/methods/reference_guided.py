"""Reference-guided pseudo-labels (Seibold, Reiss, Kleesiek & Stiefelhagen, AAAI 2022,
"Reference-guided Pseudo-Label Generation for Medical Semantic Segmentation", arXiv 2112.00735).

Visually similar regions should share their label. Each step, the labeled images of the batch
are the reference set: their pixel features (the U-Net's last decoder features, L2-normalised)
are sampled class-balanced into a bank. Every pixel of an unlabeled image (weak view) takes the
label of its best-matching reference pixels by cosine similarity (k nearest, similarity-weighted
vote), and that pseudo-label supervises the model's prediction on the strong view. Labels come
from matching, not from the model's own classifier, which is how the paper avoids the
confirmation bias of prediction-based pseudo-labels (see `pseudo_label`).

Matching scales: the bank is capped (`bank_size`, split evenly over classes) and similarities
are computed in chunks of `chunk_size` query pixels, never as one N x M matrix.

Hyperparameters (the paper's where it gives them):
- k = 1: the paper matches each pixel to its single best-fitting reference pixel.
- bank_size = 2048: reference pixels per step, up to bank_size // num_classes per class
  (cost grows linearly with it). Ours: the paper matches against its reference set.
- similarity_threshold = 0.0: optional minimum cosine similarity of the best match, in [-1, 1];
  pixels below it are left out (0 keeps every pixel, as in the paper: decoder features follow
  a ReLU, so cosines are >= 0).
- unlabeled_weight = 1.0: weight of the pseudo-label cross-entropy.
- rampup_fraction = 0.25: sigmoid ramp-up of that weight over the first quarter of the run,
  since features of an untrained network match poorly at first. The paper gives no ramp-up
  that we could check; the length is Laine & Aila's (80 of 300 epochs), the ramp shape theirs.
  It replaces the earlier fixed 200 steps.
- cutmix = False, cutmix_p = 0.5: optional CutMix of the strong views with the matched labels
  mixed alike (see `WeakToStrongSelfTraining`). Off by default because the paper has none;
  p = 0.5 is UniMatch's when it is on.
- chunk_size = 4096: query pixels per similarity matmul (ours, a memory bound).
- feature_ema = 0.99: the features that are matched (reference and query) come from an EMA
  copy of the model, in [0, 1). This is our addition, not the paper's: matching on the
  student's own features collapsed in our runs (synthetic, 5 % labels: pseudo-label Dice
  0.50 -> 0.09 and val Dice 0.63 -> 0.12 over 15 epochs, as labels and features chased each
  other), while the EMA copy held pseudo-label Dice at about 0.67. Set 0 for the plain
  variant. As for a mean teacher, the EMA is over parameters only and the copy's BatchNorm
  statistics are its own, from its own train-mode passes (see `ema_update`).

The student is what is evaluated (`evaluates = "student"`): the EMA copy only matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.methods.base import Batch
from semiseg.methods.common import (WeakToStrongSelfTraining, check_decays, check_fractions,
                                    check_range, check_weights, ema_update, make_teacher, pixels,
                                    sample_per_class)
from semiseg.methods.registry import register_method


@dataclass
class ReferenceGuidedConfig:
    k: int = 1
    """Nearest reference pixels that vote on each unlabeled pixel's label."""
    bank_size: int = 2048
    """Reference pixels kept per step: up to bank_size // num_classes of each class."""
    similarity_threshold: float = 0.0
    """Minimum cosine similarity of the best match for a pixel to be used."""
    unlabeled_weight: float = 1.0
    """Weight of the pseudo-label cross-entropy after ramp-up."""
    rampup_fraction: float = 0.25
    """Fraction of the run over which unlabeled_weight ramps up (sigmoid), in [0, 1]."""
    cutmix: bool = False
    """CutMix the strong views between unlabeled images, mixing the matched labels alike."""
    cutmix_p: float = 0.5
    """Probability that an unlabeled image gets a CutMix box, in [0, 1]."""
    chunk_size: int = 4096
    """Query pixels per similarity matmul (bounds memory at chunk_size x bank_size)."""
    feature_ema: float = 0.99
    """Features for matching come from an EMA copy of the model with this decay, in [0, 1);
    0 uses the student itself (which collapsed in our runs, see the module docstring)."""

    def __post_init__(self) -> None:
        for key in ("k", "bank_size", "chunk_size"):
            check_range(self, key, 1, integer=True)
        check_range(self, "similarity_threshold", -1, 1)
        check_weights(self, "unlabeled_weight")
        check_fractions(self, "rampup_fraction", "cutmix_p")
        check_decays(self, "feature_ema")


def sample_bank(features: Tensor, masks: Tensor, bank_size: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class-balanced reference pixels: (M, C) normalised features and (M,) labels."""
    keep = sample_per_class(masks, max(1, bank_size // num_classes))
    return pixels(F.normalize(features.detach().float(), dim=1))[keep], masks.reshape(-1)[keep]


@torch.no_grad()
def match_labels(query: Tensor, bank: Tensor, bank_labels: Tensor, k: int, num_classes: int,
                 chunk_size: int) -> tuple[Tensor, Tensor]:
    """For each (N, C) normalised query feature: the similarity-weighted vote of its k most
    similar bank features, and the similarity of its best match. Chunked over queries."""
    k = min(k, len(bank))
    labels, best = [], []
    for start in range(0, len(query), chunk_size):
        sims = query[start:start + chunk_size] @ bank.T           # (chunk, M) only
        if k == 1:  # max is much cheaper than topk, and k=1 is the paper's setting
            top_sim, top_idx = (t[:, None] for t in sims.max(dim=1))
        else:
            top_sim, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], top_sim.float().clamp(min=0) + 1e-6)  # bf16 under AMP
        labels.append(votes.argmax(1))
        best.append(top_sim[:, 0])
    return torch.cat(labels), torch.cat(best)


@register_method(__name__)
class ReferenceGuided(WeakToStrongSelfTraining):
    """Unlabeled pixels take the labels of their nearest labeled reference pixels (features)."""

    Config = ReferenceGuidedConfig

    def __init__(self, model, cfg: ReferenceGuidedConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        self.bank: tuple[Tensor, Tensor] | None = None
        self.matcher = make_teacher(model) if cfg.feature_ema > 0 else None

    def _features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            if self.matcher is None:
                return self.model(images, return_features=True)[1]
            self.matcher.train()  # batch statistics, which also update the copy's own
            return self.matcher(images, return_features=True)[1]

    def observe_labeled(self, labeled: Batch, features: Tensor) -> None:
        if self.matcher is not None:
            features = self._features(labeled.image)
        self.bank = sample_bank(features, labeled.mask, self.cfg.bank_size, self.num_classes)

    def pseudo_labels(self, unlabeled: Batch) -> tuple[Tensor, Tensor]:
        bank, bank_labels = self.bank
        feats = self._features(unlabeled.image)
        b, c, h, w = feats.shape
        query = pixels(F.normalize(feats.float(), dim=1))
        labels, best = match_labels(query, bank, bank_labels, self.cfg.k, self.num_classes,
                                    self.cfg.chunk_size)
        used = best >= self.cfg.similarity_threshold
        return labels.view(b, h, w), used.view(b, h, w)

    def after_optimizer_step(self, step: int) -> None:
        if self.matcher is not None:
            ema_update(self.matcher, self.model, self.cfg.feature_ema, step)

    def state_dict(self) -> dict[str, Any]:
        return {"matcher": None if self.matcher is None else self.matcher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.matcher is not None:
            self.matcher.load_state_dict(state["matcher"])
