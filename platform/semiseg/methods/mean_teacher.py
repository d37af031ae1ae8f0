"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017, "Mean teachers are better role models").

The teacher is an exponential moving average of the student's weights. The student sees a
strongly perturbed view of each unlabeled image, the teacher the weak view of the same pixels,
and a consistency loss pulls the student's softmax toward the teacher's. The teacher is the
model evaluated and checkpointed.

Hyperparameters (paper defaults where the paper gives them):
- ema_decay = 0.99: EMA decay during ramp-up in the paper (0.999 later); 0.99 is the usual
  segmentation setting (e.g. Yu et al. 2019, UA-MT).
- consistency_weight = 0.1: maximum weight of the MSE consistency (UA-MT's segmentation value).
- rampup_steps = 200: sigmoid ramp-up exp(-5(1-t)^2) of the consistency weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import ema_update, joint_forward, make_teacher, sigmoid_rampup
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method


@dataclass
class MeanTeacherConfig:
    ema_decay: float = 0.99
    """EMA decay of the teacher weights."""
    consistency_weight: float = 0.1
    """Weight of the student-teacher consistency after ramp-up."""
    rampup_steps: int = 200
    """Steps of the sigmoid ramp-up of the consistency weight."""


@register_method(__name__)
class MeanTeacher(Method):
    """Mean teacher: EMA teacher, softmax-MSE consistency on unlabeled images."""

    Config = MeanTeacherConfig

    def __init__(self, model: nn.Module, cfg: MeanTeacherConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.teacher = make_teacher(model)

    def consistency(self, student_logits: Tensor, unlabeled: Batch, step: int) -> tuple[Tensor, Tensor]:
        """Ramped softmax-MSE between the student on the strong view and the teacher on the
        weak view of the same pixels (gradient to the student only), and the teacher's labels."""
        with torch.no_grad():
            self.teacher.train()  # same BN mode as the student, as in the reference code
            target = self.teacher(unlabeled.image).float().softmax(1)
        weight = self.cfg.consistency_weight * sigmoid_rampup(step, self.cfg.rampup_steps)
        return weight * ((student_logits.float().softmax(1) - target) ** 2).mean(), target.argmax(1)

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        return self.consistency(self.model(unlabeled.strong), unlabeled, step)[0]

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        if unlabeled is None:
            loss_sup = segmentation_loss(self.model(labeled.image), labeled.mask)
            return StepOutput(loss_sup, {"loss_sup": loss_sup.item()})
        logits_l, logits_u = joint_forward(self.model, labeled.image, unlabeled.strong)
        loss_sup = segmentation_loss(logits_l, labeled.mask)
        loss_unsup, teacher_label = self.consistency(logits_u, unlabeled, step)
        # Soft targets on every pixel: the teacher's argmax is what quality tracking scores.
        return StepOutput(loss_sup + loss_unsup,
                          {"loss_sup": loss_sup.item(), "loss_unsup": loss_unsup.item()},
                          pseudo_label=teacher_label)

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.teacher, self.model, self.cfg.ema_decay, step)

    def eval_model(self) -> nn.Module:
        return self.teacher

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
