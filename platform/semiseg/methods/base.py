"""The Method interface: a method turns batches into a loss. The engine owns the rest
(optimizer, AMP, clipping, backward), so a method is a few pure-torch functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from semiseg.data.transforms import BLUR_P
from semiseg.methods.stages import Stage, TrainStage


@dataclass
class Batch:
    """A batch of images. `strong` is a photometrically stronger view of the same geometry as
    `image`, so pixels correspond. Unlabeled batches have `mask=None`: they never carry one."""

    image: Tensor
    strong: Tensor
    mask: Tensor | None
    index: Tensor
    fixed_target: Tensor | None = None
    """Labels the method fixed before training (`Method.fixed_targets`), warped with the image;
    -1 where it has none. Never the hidden mask."""

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.image), move(self.strong), move(self.mask), self.index,
                     move(self.fixed_target))


@dataclass
class StepOutput:
    """A training step's loss, scalar logs, and optionally the pseudo-labels it trained on
    (labels per unlabeled pixel, plus a bool mask of the pixels it used) for quality scoring."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)
    pseudo_label: Tensor | None = None
    pseudo_used: Tensor | None = None


@dataclass
class NoParams:
    """A method without hyperparameters."""


class Method(ABC):
    """Base class. Subclasses set `name` (their file's name, via `register_method`) and
    `Config` (a dataclass of hyperparameters whose defaults are the paper's; its
    `__post_init__` raises ConfigError for out-of-range values, so a bad value fails when the
    config loads).

    Contracts the registry-wide tests check for every method:
    - `uses_unlabeled = True` methods implement `unlabeled_loss(unlabeled, step)`;
    - `evaluates` names the network `eval_model()` returns ("student" or e.g. "teacher"), so
      runs record what was evaluated;
    - `total_steps` is the length of the training run, for schedule-relative ramps;
    - `stages(cfg)` is what a trial runs (one TrainStage unless the method says otherwise);
    - `identity_sections` names the config sections beyond data/model/method/train that change
      the trained model, so they enter the run identity (`Config.identity`).
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoParams
    uses_unlabeled: ClassVar[bool] = True
    evaluates: ClassVar[str] = "student"
    """Which network `eval_model()` returns: "student" (the trained model) or e.g. "teacher"."""
    identity_sections: ClassVar[tuple[str, ...]] = ()
    """Config sections (e.g. "sam") that shape this method's model and so its run identity."""
    strong_blur_p: float = BLUR_P
    """Blur probability of any strong view the method draws itself (unimatch's second view);
    the engine sets it from train.strong_blur_p, as it does for the views in each Batch."""

    def __init__(self, model: nn.Module, cfg: Any, num_classes: int,
                 total_steps: int = 1000) -> None:
        self.model = model
        self.cfg = cfg
        self.num_classes = num_classes
        self.total_steps = total_steps

    @abstractmethod
    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Return the loss for one step."""

    def unlabeled_loss(self, unlabeled: Batch, step: int) -> Tensor:
        """The loss on one unlabeled batch alone (a scalar that sends gradient to `self.model`).
        Required when `uses_unlabeled`; `training_step` usually adds it to the supervised loss."""
        raise NotImplementedError(
            f"method {type(self).__name__} sets uses_unlabeled=True but has no unlabeled_loss")

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step, e.g. to update an EMA teacher."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch, e.g. to refresh a reference bank."""

    def set_labeled_set(self, images: Tensor, masks: Tensor, index: Tensor) -> None:
        """Called once before training with every labeled image (N, 1, H, W), its mask (N, H, W)
        and dataset index (N,), unaugmented and on the training device, e.g. for a reference
        bank over the whole labeled set. Never the unlabeled images' masks. Default: ignored."""

    def fixed_targets(self, index: Tensor) -> Tensor | None:
        """Per-image labels fixed before training (e.g. SAM-refined pseudo-labels) for unlabeled
        dataset indices, -1 where none; the engine warps them with the images. None: no such labels."""
        return None

    @classmethod
    def model_options(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Keywords for `semiseg.models.create_model` that this method's network needs, given
        its `method.params` (e.g. local_contrastive's extra segmentation convolutions). Default:
        none, the configured model as it is."""
        return {}

    def trained_modules(self) -> list[nn.Module]:
        """Networks the method owns and trains beside the model (e.g. a projection head used
        only by a loss): the engine hands their parameters to the optimizer and clips their
        gradients with the model's; `state_dict` checkpoints them. Default: none."""
        return []

    @classmethod
    def stages(cls, cfg: Any) -> list[Stage]:
        """What one trial of this method runs, given the whole Config: by default, train it.
        A multi-stage method returns its chain (semiseg.methods.stages); the last stage is a
        TrainStage of the model the trial reports."""
        return [TrainStage(method=cls.name, params=dict(cfg.method.params))]

    def eval_model(self) -> nn.Module:
        """The model to evaluate and checkpoint as 'the' model (e.g. a mean teacher)."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint beyond the student model (e.g. the teacher)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
