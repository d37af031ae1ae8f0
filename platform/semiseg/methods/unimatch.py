"""UniMatch (Yang, Qi, Feng, Zhang and Shi, CVPR 2023, "Revisiting Weak-to-Strong Consistency in
Semi-Supervised Semantic Segmentation", arXiv 2208.09910), after its official medical code:
github.com/LiheYoung/UniMatch, `more-scenarios/medical/unimatch.py` and `model/unet.py`.

FixMatch-style weak-to-strong self-training, widened twice. The model itself, without
gradient, labels the weak view of each unlabeled image; its pixels at confidence >= `threshold`
supervise
- two strong views (image-level perturbation), each CutMixed with another unlabeled image in a
  box of its own; the pseudo-labels and confidences are mixed with the same box; and
- a feature-perturbed branch: the weak view's encoder features under Dropout2d, decoded again
  (feature-level perturbation; `UNet.forward(x, feature_dropout=p)`).
Each unlabeled term is a Dice loss over the confident pixels. The model is what is evaluated.

Hyperparameters (from the official medical code; `configs/acdc.yaml` unless said):
- threshold = 0.95: `conf_thresh` (the paper's tau).
- fp_dropout = 0.5: `nn.Dropout2d(0.5)` in `model/unet.py` (`need_fp`); the paper's 50 %.
- cutmix_p = 0.5: `obtain_cutmix_box(p=0.5)` in `dataset/transform.py`.
- strong_weight = 0.25: each strong view's loss, `loss_u_s1 * 0.25 + loss_u_s2 * 0.25`.
- fp_weight = 0.5: the perturbed branch's loss, `loss_u_w_fp * 0.5` (the paper's lambda).
- unlabeled_weight = 2.0: the official total is `(loss_x + U) / 2` with
  `loss_x = (CE + Dice) / 2`, i.e. `(CE + Dice + 2 U) / 4`. semiseg's supervised loss is
  CE + Dice, so 2 keeps the official balance; the overall 1/4, a learning-rate factor, is
  dropped so that `train.lr` means what it means for every other method.
- pseudo_loss = "dice": the official unlabeled loss is Dice alone
  (`criterion_dice(..., ignore=conf < conf_thresh)`); "ce_dice" averages a masked CE with it,
  as `loss_x` does. (The paper, on natural images, uses CE.)
The official schedule (SGD lr 0.01, poly, batch 12 + 12, 300 epochs) is `train.*` here.

Deviations from the official code:
- Labeled and unlabeled images go through separate forward passes (semiseg's `joint_forward`
  convention, see methods/common.py); the official code concatenates labeled and weak images.
- The CutMix partner of unlabeled image i is image i - 1 of the same batch (`cutmix.partner`:
  its strong views and its weak-pass pseudo-labels), not an image of a second unlabeled loader
  labelled by an extra eval-mode pass.
- One weak view, the engine's random affine; the official code rotates/flips at load time.
- Strong views: the engine's `strong` view and a second drawn here with semiseg's
  `strong_photometric` (the official: ColorJitter(0.5, 0.5, 0.5, 0.25) with p = 0.8 and blur
  with p = 0.5, on uint8 images).
- The supervised term is semiseg's `segmentation_loss` (CE + foreground Dice); the unlabeled
  Dice is the official one (all classes, squared sums, smooth 1e-5) on kept pixels.
- 2D slices at semiseg's size (e.g. 64 x 64) and semiseg's U-Net (bilinear upsampling, no
  encoder dropout); the official code uses 256 x 256 and a 5-level U-Net with dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.data.transforms import strong_photometric
from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import check_fractions, check_range, check_weights, masked_cross_entropy
from semiseg.methods.cutmix import cutmix_box, mix, partner
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method


@dataclass
class UniMatchConfig:
    threshold: float = 0.95
    """Minimum max-probability on the weak view for a pixel to become a pseudo-label."""
    fp_dropout: float = 0.5
    """Dropout2d probability on the encoder features of the feature-perturbed branch."""
    cutmix_p: float = 0.5
    """Probability that a strong view gets a CutMix box."""
    strong_weight: float = 0.25
    """Weight of each of the two strong views' losses inside the unlabeled term."""
    fp_weight: float = 0.5
    """Weight of the feature-perturbed branch's loss inside the unlabeled term."""
    unlabeled_weight: float = 2.0
    """Weight of the unlabeled term against semiseg's CE + Dice supervised loss."""
    pseudo_loss: Literal["dice", "ce_dice"] = "dice"
    """Loss on confident pixels: Dice (official medical code) or the mean of CE and Dice."""

    def __post_init__(self) -> None:
        check_fractions(self, "threshold", "cutmix_p")
        check_range(self, "fp_dropout", 0, 1, high_open=True)
        check_weights(self, "strong_weight", "fp_weight", "unlabeled_weight")


def masked_dice_loss(logits: Tensor, target: Tensor, keep: Tensor, smooth: float = 1e-5) -> Tensor:
    """UniMatch's Dice over the kept pixels of the batch: per class 1 - (2 sum pt + s) /
    (sum p^2 + sum t^2 + s) on softmax probabilities, averaged over all classes. No kept pixel
    gives 0 (every class reads as a perfect match), so the term vanishes rather than blows up."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    weight = keep[:, None].float()
    dims = (0, 2, 3)
    inter = (probs * onehot * weight).sum(dims)
    denom = (probs * probs * weight).sum(dims) + (onehot * weight).sum(dims)
    return (1.0 - (2 * inter + smooth) / (denom + smooth)).mean()


@dataclass
class UnlabeledTerms:
    """The unlabeled term and what it was computed from (kept for logs and tests)."""

    loss: Tensor                       # unlabeled_weight * (strong and fp losses, weighted)
    loss_strong: tuple[Tensor, Tensor]
    loss_fp: Tensor
    label: Tensor                      # weak-view pseudo-labels (N, H, W)
    used: Tensor                       # their confident pixels (N, H, W), bool
    boxes: tuple[Tensor, Tensor]       # each strong view's CutMix box (N, H, W), bool
    strong_images: tuple[Tensor, Tensor]
    strong_labels: tuple[Tensor, Tensor]
    strong_used: tuple[Tensor, Tensor]


@register_method(__name__)
class UniMatch(Method):
    """Weak-to-strong pseudo-labels for two CutMixed strong views and a feature-perturbed branch."""

    Config = UniMatchConfig

    def __init__(self, model: nn.Module, cfg: UniMatchConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        # Own generator for the second strong view and the boxes, checkpointed with the method.
        # Seeded from the run's seed (the engine calls torch.manual_seed first) without drawing
        # from the global stream; each DDP rank gets its own.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.generator = torch.Generator().manual_seed(
            (torch.initial_seed() * 7919 + 0x51A7 + rank) % 2**63)

    def pseudo_loss(self, logits: Tensor, label: Tensor, used: Tensor) -> Tensor:
        dice = masked_dice_loss(logits, label, used)
        if self.cfg.pseudo_loss == "dice":
            return dice
        return (masked_cross_entropy(logits, label, used) + dice) / 2

    def unlabeled_terms(self, unlabeled: Batch) -> UnlabeledTerms:
        image = unlabeled.image
        weak_logits, fp_logits = self.model(image, feature_dropout=self.cfg.fp_dropout)
        with torch.no_grad():
            conf, label = weak_logits.detach().float().softmax(1).max(1)
        used = conf >= self.cfg.threshold

        n, _, height, width = image.shape
        views = (unlabeled.strong, strong_photometric(image, self.generator, self.strong_blur_p))
        boxes = tuple(cutmix_box(n, height, width, self.generator, p=self.cfg.cutmix_p,
                                 device=image.device) for _ in views)
        # Inside the box: the partner's strong view, and its weak-view labels and confidences,
        # so image and target stay aligned pixel for pixel.
        strong_images = tuple(mix(v, partner(v), b) for v, b in zip(views, boxes))
        strong_labels = tuple(mix(label, partner(label), b) for b in boxes)
        strong_used = tuple(mix(conf, partner(conf), b) >= self.cfg.threshold for b in boxes)
        strong_logits = self.model(torch.cat(strong_images)).chunk(2)

        loss_strong = tuple(self.pseudo_loss(lg, lb, u)
                            for lg, lb, u in zip(strong_logits, strong_labels, strong_used))
        loss_fp = self.pseudo_loss(fp_logits, label, used)
        loss = self.cfg.unlabeled_weight * (
            self.cfg.strong_weight * (loss_strong[0] + loss_strong[1]) + self.cfg.fp_weight * loss_fp)
        return UnlabeledTerms(loss, loss_strong, loss_fp, label, used, boxes, strong_images,
                              strong_labels, strong_used)

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        return self.unlabeled_terms(unlabeled).loss

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        loss_sup = segmentation_loss(self.model(labeled.image), labeled.mask)
        if unlabeled is None:
            return StepOutput(loss_sup, {"loss_sup": loss_sup.item()})
        terms = self.unlabeled_terms(unlabeled)
        logs = {
            "loss_sup": loss_sup.item(), "loss_unsup": terms.loss.item(),
            "loss_strong": (terms.loss_strong[0].item() + terms.loss_strong[1].item()) / 2,
            "loss_fp": terms.loss_fp.item(),
            "mask_ratio": terms.used.float().mean().item(),  # on the weak view, as officially
        }
        # The weak view's labels score against the hidden masks (the mixed ones cover partners).
        return StepOutput(loss_sup + terms.loss, logs, pseudo_label=terms.label,
                          pseudo_used=terms.used)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
