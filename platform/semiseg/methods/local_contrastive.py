"""Local contrastive loss with pseudo-label based self-training (Chaitanya, Erdil, Karani &
Konukoglu, Medical Image Analysis 2023; arXiv 2112.09645). Official code (TensorFlow 1):
krishnabits001/pseudo_label_contrastive_training, `train_model/tr_baseline.py` (stage 1) and
`train_model/prop_method_joint_tr_rand_init.py` + `models.py` (the joint training).

A multi-stage method, declared as data by `LocalContrastive.stages` and run by
semiseg.distributed.stages like any other chain:

    baseline  supervised U-Net on the labeled images (the official `tr_baseline.py`)
    round0    this method, `init` = baseline's checkpoint
    round1    this method, `init` = round0's checkpoint   ... `rounds` in all; the last is the
              trial's model

Each round starts from the model its `init` checkpoint selected on val (`best_model`, the
official `get_max_chkpt_file`) and labels the unlabeled images with a frozen copy of that same
model: pseudo-labels refreshed once per round, from the previous round's best-val model.

Within a round (one step):
- segmentation loss (`segmentation_loss`) on the labeled batch only, as in the paper;
- the local contrastive loss (semiseg.methods.local_contrastive_loss) on a projection head
  h_phi (two 1x1 convolutions, method-owned, `trained_modules`) over the last decoder map, for
  labeled images (true labels) and unlabeled images (pseudo-labels) alike;
- two intensity views per image: the batch's `image` and its `strong` view (same geometry);
- pairs: each image's two views, and cross-image pairs (view 1 of image i with view 2 of
  another image: labeled with unlabeled when both batches are there), as the official batch
  mixes same-image and labeled/unlabeled pairs;
- the U-Net gets the paper's segmentation-specific layers g_xi (`model_options`:
  UNet(seg_convs=True), two 3x3 convolutions before the 1x1 classifier), so the contrasted
  features are not the classifier's input.

Hyperparameters (official code, `prop_method_joint_tr_rand_init.py` argparse defaults, unless
said otherwise):
- temperature = 0.1 (`--temp_fac`); contrastive_weight = 0.1 (`--lamda_local`).
- positives = 3 (`--no_of_pos_eles`): anchor pixels drawn per class per image. The official
  `--no_of_neg_eles` = 3 draws negative pixel indices that its loss never reads (negatives are
  the class means), so there is no such parameter here.
- include_background = False: the official loss contrasts the foreground classes only
  (`pos_cls_ref` / `neg_cls_ref` skip channel 0).
- min_class_pixels = 3 (ours): a class enters a pair where each image has at least this many
  pixels of it (so `positives` distinct anchors exist); the official code instead admits only
  images that contain every class (`cls_ref`), which a 64-pixel crop often does not.
- rounds = 3 (`max_iter = 3`): self-training rounds after the baseline; each is a full fit of
  `train.epochs` (the official 15 000 iterations are 3 x 5 000, each as long as the baseline).
- seg_convs = True: g_xi as in `models.py` (`seg_c1_a`, `seg_c1_b`); False trains the plain U-Net.
- min_agreement = 0.0 (off, as `--test_aug_overlap 0`): the optional cleaning. An unlabeled
  image whose pseudo-labels on it and on its horizontal flip agree below this mean foreground
  Dice is left out of the contrast (the official test: two augmented predictions of a volume,
  kept if their Dice exceeds `--test_f1_threshold` 0.9).
- init: the checkpoint a round starts from (a stage input; the stage runner sets it).

Deviations from the official code:
- The pseudo-labels are not CRF-smoothed (the official `calc_crf_op`; no dense-CRF package
  here), and are predicted each step on the batch's geometric view by the frozen labeller, not
  once per round on the unaugmented volume (the same network and weights, so the same labels up
  to interpolation).
- Views: our label-safe `strong_photometric` (issue 11) against the unjittered image, not two
  draws of brightness +-0.3 / contrast 0.7-1.3 (`brit_cont_net`), which on mni-tissue would move
  a tissue level by more than the grey-white gap.
- A round's student starts from the init checkpoint's whole U-Net; coming from the plain
  baseline, the classifier and g_xi keep their fresh initialisation (the official code copies
  everything but the `seg_` and `cont_` variables). The projection head starts fresh every
  round (the official restores it with the round's best model); optimizer and LR schedule
  restart each round (ours: a stage is a fit), and the best model is selected within a round,
  not across rounds.
- The baseline is our plain supervised U-Net (the same network as the supervised comparison),
  without g_xi; only its encoder and decoder pass on, as in the official code.
- Segmentation loss: our CE + soft Dice, not the official Dice with background; the contrastive
  images are the batch's own (labeled and unlabeled, 2 views each) rather than a separate draw.
- Projection-head gradients are not all-reduced across DDP workers, so the method refuses a
  DDP-wrapped model (ray.num_workers must be 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from semiseg.checkpoint_io import mismatch_summary, read_weights_only
from semiseg.errors import ConfigError, SemisegError
from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import check_fractions, check_range, check_weights, unwrap
from semiseg.methods.local_contrastive_loss import local_contrastive_loss
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import FULL_SUPERVISION_METHOD, method_config, register_method
from semiseg.methods.stages import Stage, TrainStage
from semiseg.models import model_options
from semiseg.sam.coarse import checkpoint_file


@dataclass
class LocalContrastiveConfig:
    init: str = ""
    """Checkpoint (folder) the round starts from and pseudo-labels with; set by the stage runner."""
    temperature: float = 0.1
    """Temperature of the cosine similarities."""
    contrastive_weight: float = 0.1
    """Weight of the local contrastive loss (lambda_local)."""
    positives: int = 3
    """Anchor pixels drawn per class per image."""
    min_class_pixels: int = 3
    """Pixels of a class each image of a pair needs for the class to enter that pair."""
    include_background: bool = False
    """Contrast class 0 too (the official code leaves it out)."""
    rounds: int = 3
    """Self-training rounds after the supervised baseline."""
    seg_convs: bool = True
    """Two 3x3 convolutions before the classifier (g_xi)."""
    min_agreement: float = 0.0
    """Leave out unlabeled images whose flip-agreement Dice is below this (0: keep all)."""

    def __post_init__(self) -> None:
        check_range(self, "temperature", 0, low_open=True)
        check_weights(self, "contrastive_weight")
        check_range(self, "positives", 1, integer=True)
        check_range(self, "min_class_pixels", 1, integer=True)
        check_range(self, "rounds", 1, integer=True)
        check_fractions(self, "min_agreement")


def projection_head(channels: int) -> nn.Module:
    """h_phi: 1x1 conv (no bias) -> BN -> ReLU -> 1x1 conv (no bias), width kept (`cont_c1_a/b`)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False))


def load_init_weights(path: str) -> dict[str, Tensor]:
    """The val-selected weights (else the last) of a training checkpoint (folder)."""
    file = checkpoint_file(path)
    state = read_weights_only(file, "checkpoint (method.params.init)")
    weights = state.get("best_model") or state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise SemisegError(f"{file} (method.params.init): not a semiseg training checkpoint")
    return weights


def start_from(student: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load `weights` into the student. From a checkpoint without g_xi (the baseline) into a
    student with it, everything but the head loads and the head keeps its initialisation."""
    fresh_head = model_options(weights) != model_options(student.state_dict())
    if fresh_head:
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    try:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise SemisegError(f"method.params.init does not fit the model (another model.* than this "
                           f"run's?): {mismatch_summary(exc, 200)}") from None
    if unexpected or any(not (fresh_head and k.startswith("head.")) for k in missing):
        raise SemisegError(f"method.params.init does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]} (another model.* than this run's?)")


def frozen_labeller(student: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A frozen network with `weights` (the student's architecture, with or without g_xi as the
    weights have it), in eval mode."""
    net = unwrap(student)
    options = model_options(weights)
    try:
        labeller = type(net)(net.in_channels, net.num_classes, net.feature_dim, net.depth, **options)
    except (AttributeError, TypeError) as exc:
        raise SemisegError(f"local_contrastive needs the U-Net (model.name=unet): {exc}") from None
    labeller.load_state_dict(weights)
    device = next(net.parameters()).device
    return labeller.to(device).eval().requires_grad_(False)


def flip_agreement(labeller: nn.Module, image: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per image, the mean foreground Dice between `labels` (the labeller on `image`) and the
    labeller's labels on the horizontally flipped image, flipped back (1 where neither has any)."""
    flipped = labeller(image.flip(-1)).argmax(1).flip(-1)
    dice = []
    for c in range(1, num_classes):
        a, b = labels == c, flipped == c
        inter, total = (a & b).sum((1, 2)).float(), (a.sum((1, 2)) + b.sum((1, 2))).float()
        dice.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)))
    return torch.stack(dice).mean(0)


@register_method(__name__)
class LocalContrastive(Method):
    """Supervised baseline, then rounds of segmentation + local contrastive loss with
    pseudo-labels from the previous stage's best-val model."""

    Config = LocalContrastiveConfig

    @classmethod
    def stages(cls, cfg: Any) -> list[Stage]:
        params = dict(cfg.method.params)
        stages: list[Stage] = [TrainStage(FULL_SUPERVISION_METHOD, {}, name="baseline")]
        previous = "baseline"
        for r in range(method_config(cls.name, params).rounds):
            stages.append(TrainStage(cls.name, params, name=f"round{r}", inputs={"init": previous}))
            previous = f"round{r}"
        return stages

    @classmethod
    def model_options(cls, params: dict[str, Any]) -> dict[str, Any]:
        return {"seg_convs": True} if method_config(cls.name, params).seg_convs else {}

    def __init__(self, model: nn.Module, cfg: LocalContrastiveConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        if not cfg.init:
            raise ConfigError("method local_contrastive needs method.params.init (the checkpoint a "
                              "round starts from); in a trial its stage runner sets it")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ConfigError("local_contrastive's projection head is not synchronised across DDP "
                              "workers; run it with ray.num_workers=1")
        weights = load_init_weights(cfg.init)
        start_from(unwrap(model), weights)
        self.labeller = frozen_labeller(model, weights)
        net = unwrap(model)
        self.projection = projection_head(net.feature_dim).to(next(net.parameters()).device)
        first = 0 if cfg.include_background else 1
        self.classes = torch.arange(first, num_classes)

    def trained_modules(self) -> list[nn.Module]:
        return [self.projection]

    @torch.no_grad()
    def pseudo_labels(self, unlabeled: Batch) -> Tensor:
        """The frozen labeller's labels on the geometric view; -1 on images the agreement
        filter leaves out."""
        labels = self.labeller(unlabeled.image).argmax(1)
        if self.cfg.min_agreement > 0:
            keep = flip_agreement(self.labeller, unlabeled.image, labels, self.num_classes)
            labels[keep < self.cfg.min_agreement] = -1
        return labels

    def embed(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Logits of the geometric view, and the projected embeddings of both views."""
        n = len(batch.image)
        logits, feats = self.model(torch.cat([batch.image, batch.strong]), return_features=True)
        self.projection.train()
        z = self.projection(feats)
        return logits[:n], z[:n], z[n:]

    def contrast(self, view1: Tensor, view2: Tensor, labels: Tensor, shift: int) -> Tensor:
        """Weighted loss over same-image pairs and cross pairs (image i with image i + shift)."""
        first, second, y2 = [view1], [view2], [labels]
        if 0 < shift < len(labels):
            second.append(view2.roll(shift, 0))
            y2.append(labels.roll(shift, 0))
            first.append(view1)
        loss, _ = local_contrastive_loss(
            torch.cat(first), torch.cat([labels] * len(first)), torch.cat(second), torch.cat(y2),
            self.classes.to(labels.device), self.cfg.temperature, self.cfg.positives,
            self.cfg.min_class_pixels)
        return self.cfg.contrastive_weight * loss

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        _, z1, z2 = self.embed(unlabeled)
        return self.contrast(z1, z2, self.pseudo_labels(unlabeled), shift=1)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        logits, z1, z2 = self.embed(labeled)
        labels, shift, pseudo = labeled.mask, 1, None
        if unlabeled is not None:
            pseudo = self.pseudo_labels(unlabeled)
            _, u1, u2 = self.embed(unlabeled)  # a pass of its own: BatchNorm (common.joint_forward)
            z1, z2 = torch.cat([z1, u1]), torch.cat([z2, u2])
            labels, shift = torch.cat([labels, pseudo]), len(labeled.mask)
        loss_sup = segmentation_loss(logits, labeled.mask)
        loss_con = self.contrast(z1, z2, labels, shift)
        logs = {"loss_sup": loss_sup.item(), "loss_unsup": loss_con.item()}
        used = None
        if pseudo is not None:
            used = pseudo >= 0
            logs["mask_ratio"] = used.float().mean().item()
        return StepOutput(loss_sup + loss_con, logs, pseudo_label=pseudo.clamp(min=0) if pseudo
                          is not None else None, pseudo_used=used)

    def state_dict(self) -> dict[str, Any]:
        return {"projection": self.projection.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projection.load_state_dict(state["projection"])
