"""SAM-refined pseudo-labels (Keuth et al. 2024, "SAM Carries the Burden: A Semi-Supervised
Approach Refining Pseudo Labels for Medical Segmentation", arXiv 2411.12602).

A U-Net trained on the labeled images predicts coarse masks on the unlabeled images; boxes and
seed points taken from them prompt SAM, whose refined masks become pseudo-labels (SAM works at
each image's source resolution, and a quality gate chosen on val keeps the coarse mask where SAM
did not help: semiseg.sam.native, semiseg.sam.gate); a model then
trains on the labeled images plus those pseudo-labels as if they were labels. This method is
that last step: it reads the refined pseudo-labels from a manifest written by
`semiseg pseudolabel` (semiseg.sam + semiseg.distributed.pseudolabel). A trial runs the whole
loop: `SamRefined.stages` declares it as data (a supervised coarse model, then per round a
PseudoLabelStage and a retrain whose `manifest` is that stage's output, the retrained model being
the next round's coarse model), and semiseg.distributed.stages runs it.

The pseudo-labels are fixed for the whole run, so the engine warps them with each unlabeled
image (`Method.fixed_targets`); pixels warped in from outside the image carry no label.

Hyperparameters:
- manifest: the pseudo-label manifest (a stage input: the runner sets it in a trial).
- unlabeled_weight = 1.0: weight of the pseudo-label cross-entropy (the paper trains on both
  sets as one, i.e. weight 1).
- min_sam_iou = 0.0: a class whose SAM-predicted IoU in an image is below this is left out of
  that image's pseudo-label (ignored, not background); 0 keeps every refined mask, as the paper.
  It acts only where SAM's mask was used: the quality gate (`sam.gate`, semiseg.sam.gate) may
  have kept the coarse mask of a class in an image, and then the manifest says so.
- rounds = 1: coarse -> refine -> retrain rounds a trial runs (the paper: one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from semiseg.errors import ConfigError, SemisegError
from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import masked_cross_entropy
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import FULL_SUPERVISION_METHOD, method_config, register_method
from semiseg.methods.stages import PseudoLabelStage, Stage, TrainStage
from semiseg.sam.store import read_manifest


@dataclass
class SamRefinedConfig:
    manifest: str = ""
    """Pseudo-label manifest (manifest.parquet or its folder); a trial's stage runner sets it."""
    unlabeled_weight: float = 1.0
    """Weight of the cross-entropy on the SAM pseudo-labels."""
    min_sam_iou: float = 0.0
    """Leave out a class in an image when SAM's predicted IoU for it is below this."""
    rounds: int = 1
    """Coarse -> refine -> retrain rounds of the SAM chain."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"method.params.rounds={self.rounds}: expected an integer >= 1")
        if self.unlabeled_weight < 0:
            raise ConfigError(f"method.params.unlabeled_weight={self.unlabeled_weight}: expected 0 or more")
        if not 0.0 <= self.min_sam_iou <= 1.0:
            raise ConfigError(f"method.params.min_sam_iou={self.min_sam_iou}: expected a value in [0, 1]")


@register_method(__name__)
class SamRefined(Method):
    """Labeled images plus fixed SAM-refined pseudo-labels on the unlabeled images."""

    Config = SamRefinedConfig
    identity_sections = ("sam",)  # SAM makes the pseudo-labels, so it shapes the model

    @classmethod
    def stages(cls, cfg) -> list[Stage]:
        """Coarse U-Net on the labeled images, then per round: SAM refines the latest model's
        masks on the unlabeled images, and this method retrains on labeled + pseudo-labels."""
        params = dict(cfg.method.params)
        stages: list[Stage] = [TrainStage(FULL_SUPERVISION_METHOD, {}, name="coarse")]
        model = "coarse"
        for r in range(method_config(cls.name, params).rounds):
            stages.append(PseudoLabelStage(f"pseudolabels-round{r}", model=model, round=r))
            stages.append(TrainStage(cls.name, params, name=f"round{r}",
                                     inputs={"manifest": f"pseudolabels-round{r}"}))
            model = f"round{r}"
        return stages

    def __init__(self, model: nn.Module, cfg: SamRefinedConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        if not cfg.manifest:
            raise ConfigError("method sam_refined needs method.params.manifest (from `semiseg pseudolabel`);"
                              " in a trial its stage runner sets it")
        self.row_of, self.labels = _load_targets(cfg.manifest, num_classes, cfg.min_sam_iou)

    def fixed_targets(self, index: Tensor) -> Tensor:
        rows = self.row_of[index.cpu().clamp(max=len(self.row_of) - 1)]
        rows[index.cpu() >= len(self.row_of)] = -1
        labels = self.labels[rows.clamp(min=0)].long()
        labels[rows < 0] = -1  # an unlabeled image the manifest does not cover trains nothing
        return labels

    def _target(self, unlabeled: Batch) -> Tensor:
        # The engine hands warped targets; a caller that did not warp the images gets them as stored.
        target = unlabeled.fixed_target
        if target is None:
            target = self.fixed_targets(unlabeled.index)
        target = target.to(unlabeled.image.device)
        if target.shape[-2:] != unlabeled.image.shape[-2:]:
            raise SemisegError(f"{self.cfg.manifest}: pseudo-labels are {tuple(target.shape[-2:])}, "
                               f"images {tuple(unlabeled.image.shape[-2:])}; regenerate them for this data")
        return target

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        target = self._target(unlabeled)
        used = target >= 0
        return masked_cross_entropy(self.model(unlabeled.image), target.clamp(min=0), used)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        sup = segmentation_loss(self.model(labeled.image), labeled.mask)
        if unlabeled is None:
            return StepOutput(sup, {"loss_sup": sup.item()})
        target = self._target(unlabeled)
        unsup = self.unlabeled_loss(unlabeled, step)
        logs = {"loss_sup": sup.item(), "loss_unsup": unsup.item(),
                "mask_ratio": (target >= 0).float().mean().item()}
        return StepOutput(sup + self.cfg.unlabeled_weight * unsup, logs,
                          pseudo_label=target.clamp(min=0), pseudo_used=target >= 0)


def _load_targets(manifest: str, num_classes: int, min_sam_iou: float) -> tuple[Tensor, Tensor]:
    """(row per dataset index, -1 if none) and the (rows, H, W) int16 labels, -1 = ignored."""
    frame = read_manifest(manifest)
    iou_columns = [c for c in frame.columns if c.startswith("sam_iou/")]
    labels = []
    for _, row in frame.iterrows():
        mask = np.array(Image.open(row["path"])).astype(np.int16)
        if mask.max(initial=0) >= num_classes:
            raise SemisegError(f"{row['path']}: label {int(mask.max())} outside the {num_classes} classes")
        for class_id, column in enumerate(iou_columns, start=1):
            score = row[column]
            # where the quality gate kept the coarse mask, SAM's score says nothing about it
            used = row.get(column.replace("sam_iou/", "sam_used/"), 1.0)
            if used and not math.isnan(score) and score < min_sam_iou:
                mask[mask == class_id] = -1
        labels.append(torch.from_numpy(mask))
    indices = torch.as_tensor(frame["index"].to_numpy().copy(), dtype=torch.long)
    row_of = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long)
    row_of[indices] = torch.arange(len(indices))
    return row_of, torch.stack(labels)
