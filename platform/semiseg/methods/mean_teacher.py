"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017, "Mean teachers are better role models";
code: CuriousAI/mean-teacher, `pytorch/main.py`).

The teacher is an exponential moving average of the student's parameters; its BatchNorm
running statistics are its own, accumulated by its own train-mode passes (as in the reference
PyTorch code and HiLab-git/SSL4MIS `train_mean_teacher_2D.py`), so they match its weights.
The student sees a strongly perturbed view of each unlabeled image, the teacher the weak view of
the same pixels, and a consistency loss pulls the student's softmax toward the teacher's. The
teacher is the model evaluated and checkpointed (`evaluates = "teacher"`), as CuriousAI selects
the EMA model; SSL4MIS evaluates the student instead.

Hyperparameters:
- ema_decay = 0.99, in [0, 1): SSL4MIS's value for 2D segmentation (the paper: 0.99 during
  ramp-up, 0.999 after; CuriousAI's PyTorch CIFAR-10 run: 0.97). a = min(1 - 1/(step+1), decay).
- consistency_weight = 0.1, >= 0: maximum weight of the softmax-MSE consistency (SSL4MIS).
- rampup_fraction = 1.0, in [0, 1]: the sigmoid ramp-up exp(-5(1-t)^2) of that weight runs
  over this fraction of the run. SSL4MIS ramps over the whole run: its ramp unit is
  iter_num // 150 with consistency_rampup = 200, i.e. 30 000 of its 30 000 iterations (UA-MT
  likewise 40 x 150 = 6000 of 6000). CuriousAI's CIFAR-10 runs ramp over 5 of 180 epochs.
  It replaces the earlier fixed 200 steps.
- cutmix = False, cutmix_p = 0.5: optional CutMix of the student's strong views between
  unlabeled images, with the teacher's soft targets (made on the unmixed weak views) mixed by
  the same boxes; partner = the batch rolled by one. Off by default because neither the paper
  nor SSL4MIS uses it; p = 0.5 is UniMatch's when it is on.

Deviations: SSL4MIS also switches the consistency off for its first 1000 iterations (3 % of
the run); with the full-run sigmoid ramp the weight there is below 1 % of its maximum, so we
leave that cut-off out. SSL4MIS perturbs the teacher's input with clamped Gaussian noise; our
teacher sees the weak view and the student the strong one, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import (UnlabeledCutMix, check_decays, check_fractions, check_weights,
                                    ema_update, joint_forward, make_teacher, schedule_rampup)
from semiseg.methods.losses import segmentation_loss
from semiseg.methods.registry import register_method


@dataclass
class MeanTeacherConfig:
    ema_decay: float = 0.99
    """EMA decay of the teacher parameters, in [0, 1)."""
    consistency_weight: float = 0.1
    """Weight of the student-teacher consistency after ramp-up, >= 0."""
    rampup_fraction: float = 1.0
    """Fraction of the run over which the consistency weight ramps up (sigmoid), in [0, 1]."""
    cutmix: bool = False
    """CutMix the student's strong views between unlabeled images, mixing the targets alike."""
    cutmix_p: float = 0.5
    """Probability that an unlabeled image gets a CutMix box, in [0, 1]."""

    def __post_init__(self) -> None:
        check_decays(self, "ema_decay")
        check_weights(self, "consistency_weight")
        check_fractions(self, "rampup_fraction", "cutmix_p")


@register_method(__name__)
class MeanTeacher(Method):
    """Mean teacher: EMA teacher, softmax-MSE consistency on unlabeled images."""

    Config = MeanTeacherConfig
    evaluates = "teacher"

    def __init__(self, model: nn.Module, cfg: MeanTeacherConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        self.teacher = make_teacher(model)
        self.cutmix = UnlabeledCutMix(cfg.cutmix, cfg.cutmix_p)

    def consistency(self, student_logits: Tensor, unlabeled: Batch, step: int,
                    box: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Ramped softmax-MSE between the student on the (CutMixed with `box`) strong view and
        the teacher on the weak view of the same pixels (mixed alike), with gradient to the
        student only; and the teacher's unmixed labels, for pseudo-label scoring."""
        with torch.no_grad():
            # Train mode, as in the reference code: batch statistics, and the teacher's own
            # running statistics (what it is evaluated with) follow its own weights.
            self.teacher.train()
            probs = self.teacher(unlabeled.image).float().softmax(1)
        target = self.cutmix.apply(probs, box)
        ramp = schedule_rampup(step, self.cfg.rampup_fraction, self.total_steps)
        loss = self.cfg.consistency_weight * ramp * ((student_logits.float().softmax(1) - target) ** 2).mean()
        return loss, probs.argmax(1)

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        box = self.cutmix.box(unlabeled.strong, step)
        student_logits = self.model(self.cutmix.apply(unlabeled.strong, box))
        return self.consistency(student_logits, unlabeled, step, box)[0]

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        if unlabeled is None:
            loss_sup = segmentation_loss(self.model(labeled.image), labeled.mask)
            return StepOutput(loss_sup, {"loss_sup": loss_sup.item()})
        box = self.cutmix.box(unlabeled.strong, step)
        logits_l, logits_u = joint_forward(self.model, labeled.image,
                                           self.cutmix.apply(unlabeled.strong, box))
        loss_sup = segmentation_loss(logits_l, labeled.mask)
        loss_unsup, teacher_label = self.consistency(logits_u, unlabeled, step, box)
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
