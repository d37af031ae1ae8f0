"""The running half of the engine: a `Trainer` receives built parts (model, method, device
tensors, optimizer, scheduler, random streams, loop settings) and runs epochs, evaluates and
checkpoints. It reads no Config: `semiseg.engine.build_trainer` assembles it from one, and a test
can hand it a hand-written method and a few tensors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.checkpoint_io import CHECKPOINT_FILE, read_weights_only
from semiseg.data.sampling import RandomBatches, SplitTensors, Subset
from semiseg.data.transforms import BLUR_P, strong_photometric, weak_geometric
from semiseg.errors import SemisegError
from semiseg.methods.base import Batch, Method, StepOutput
from semiseg.methods.common import unwrap
from semiseg.metrics import MetricAccumulator
from semiseg.pseudo_quality import PseudoLabelScore
from semiseg.speed import CompiledStep, SpeedSettings, batch_layout, check_speed, compile_networks
from semiseg.volume_metrics import VolumeLayout, volume_metrics


class TrainingDiverged(SemisegError):
    """The loss became NaN or Inf."""


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs, as plain values (engine.build_trainer takes them from the config)."""

    epochs: int
    steps_per_epoch: int
    grad_clip: float = 0.0
    """Gradient-norm clip; 0 turns it off."""
    amp: bool = False
    """bf16 autocast; used only on CUDA."""
    overlays: int = 0
    """Test images returned in FitResult.examples."""
    run_hash: str = ""
    """Written into every checkpoint; `load` refuses a checkpoint that holds another."""
    rank: int = 0
    """This process's DDP rank: only rank 0 writes checkpoints."""
    strong_blur_p: float = BLUR_P
    """Probability of the blur in each strong view (train.strong_blur_p)."""
    speed: SpeedSettings = SpeedSettings()
    """channels_last / compile / cuda_graphs (semiseg.speed); the Trainer compiles the networks
    and the step itself, while channels-last weights are set where the model is built."""

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class RandomStreams:
    """Every random stream the loop draws from, all checkpointed, so a run is reproducible
    and a resumed run continues the same streams."""

    labeled: RandomBatches
    unlabeled: RandomBatches
    augment: torch.Generator
    strong: torch.Generator = field(default_factory=torch.Generator)
    """The strong photometric views' own stream: a method that never looks at them (supervised)
    draws the same geometric augmentations whatever the strong views do."""
    ambient: list[Tensor] = field(default_factory=list)
    """The states torch's global RNG is given during each epoch (CPU, then the CUDA device's):
    method code such as random pixel sampling draws from it. The caller's global RNG is
    restored after the epoch. Empty: epochs leave the global RNG alone."""


@dataclass
class LoopState:
    epoch: int = 0            # next epoch to run
    best_val_dice: float = -1.0
    best_epoch: int = -1
    best_model: dict[str, Tensor] | None = None


@dataclass
class Scores:
    metrics: dict[str, float]
    pred: Tensor           # (n, H, W) predicted labels
    dice: np.ndarray       # (n, C - 1) per-image Dice of each foreground class
    cases: list[dict[str, Any]] = field(default_factory=list)
    """Volume datasets: one row per case (semiseg.volume_metrics); empty for 2D datasets."""


class Trainer:
    """Runs epochs of a built method on built tensors (semiseg.engine.build_trainer builds them).

    `model` is what the optimizer trains (possibly DDP-wrapped) and `method.model` is it too;
    `classes` name the label values (background first) and `ids[i]` names dataset image i.
    """

    def __init__(self, model: nn.Module, method: Method, tensors: SplitTensors,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 streams: RandomStreams, classes: Sequence[str], ids: Sequence[str],
                 loop: LoopSettings, volumes: VolumeLayout | None = None) -> None:
        self.model, self.method, self.tensors = model, method, tensors
        self.volumes = volumes  # set: val and test are scored per 3D case (evaluate)
        self.optimizer, self.scheduler, self.streams = optimizer, scheduler, streams
        self.classes, self.ids, self.loop = list(classes), ids, loop
        self.device = tensors.labeled.images.device
        self.state = LoopState()
        self.use_unlabeled = method.uses_unlabeled and len(tensors.unlabeled) > 0
        speed = loop.speed
        check_speed(speed, self.device)
        self._layout = batch_layout(speed)
        labeled = tensors.labeled
        # [:]: a tensor as it is; gathered rows (a mapped cache on the CPU) read into one.
        method.set_labeled_set(self._layout(labeled.images[:]), labeled.masks[:], labeled.index)
        # Eager: looked up at each call, so the method's step can be wrapped after the build
        # (the hidden-mask leak test records what it receives that way).
        self._training_step: Callable[..., StepOutput] = (
            lambda labeled, unlabeled, step: self.method.training_step(labeled, unlabeled, step))
        if speed.compiles:
            compile_networks(model, method, speed)
            self._training_step = CompiledStep(method.training_step, speed)

    @property
    def method_name(self) -> str:
        return getattr(self.method, "name", type(self.method).__name__)

    # ---- checkpoints -------------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        s = self.streams
        return [s.labeled.generator, s.unlabeled.generator, s.augment, s.strong]

    def save(self, directory: Path) -> Path:
        """Write the full state atomically (temp file, then rename) and return the directory."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "model": unwrap(self.model).state_dict(), "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch, "best_val_dice": self.state.best_val_dice,
            "best_epoch": self.state.best_epoch, "best_model": self.state.best_model,
            "rng": [g.get_state() for g in self._generators()], "ambient_rng": self.streams.ambient,
            "config_hash": self.loop.run_hash,
        }
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)
        return directory

    def load(self, directory: Path) -> None:
        path = directory / CHECKPOINT_FILE
        state = read_weights_only(path, "checkpoint")  # to CPU; load_state_dict copies to the device
        if not isinstance(state, dict):
            raise SemisegError(f"checkpoint {path} holds a {type(state).__name__}, not a semiseg training state")
        if state.get("config_hash") != self.loop.run_hash:
            raise SemisegError(f"checkpoint {path} was written by a different config")
        unwrap(self.model).load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for gen, rng in zip(self._generators(), state["rng"]):
            gen.set_state(rng.cpu())
        if state.get("ambient_rng"):  # absent in checkpoints of older versions
            self.streams.ambient = [s.cpu() for s in state["ambient_rng"]]
        self.state = LoopState(state["epoch"], state["best_val_dice"], state["best_epoch"],
                               state["best_model"])

    # ---- training ----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.loop.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _ambient_rng(self) -> Iterator[None]:
        """torch's global RNG at `streams.ambient` inside, the caller's own again after."""
        if not self.streams.ambient:
            yield
            return
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self.streams.ambient[0])
            for device, state in zip(cuda, self.streams.ambient[1:]):
                torch.cuda.set_rng_state(state, device)
            yield
            self.streams.ambient = [torch.get_rng_state(), *map(torch.cuda.get_rng_state, cuda)]

    def _labeled_batch(self) -> Batch:
        pick = self.streams.labeled.next()
        part, gen = self.tensors.labeled, self.streams.augment
        image, mask, _ = weak_geometric(part.images[pick], part.masks[pick], gen)
        strong = strong_photometric(image, self.streams.strong, self.loop.strong_blur_p)
        return Batch(self._layout(image), self._layout(strong), mask, part.index[pick])

    def _unlabeled_batch(self) -> tuple[Batch, Tensor | None]:
        """An unlabeled batch (no mask) plus the hidden masks warped the same way, for scoring."""
        pick = self.streams.unlabeled.next()
        part, gen = self.tensors.unlabeled, self.streams.augment
        hidden = self.tensors.hidden_unlabeled_masks
        fixed = self.method.fixed_targets(part.index[pick])
        # +1 so that pixels warped in from outside the image (zeros) read as -1, "no label".
        image, fixed_warped, hidden_warped = weak_geometric(
            part.images[pick], None if fixed is None else fixed.to(self.device) + 1, gen,
            extra=None if hidden is None else hidden[pick],
        )
        fixed_warped = None if fixed_warped is None else fixed_warped - 1
        strong = strong_photometric(image, self.streams.strong, self.loop.strong_blur_p)
        batch = Batch(self._layout(image), self._layout(strong), None, part.index[pick], fixed_warped)
        return batch, hidden_warped

    def _begin_graph_step(self) -> None:
        """With CUDA graphs, a new step may overwrite the previous replay's outputs."""
        if self.loop.speed.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def train_step(self, step: int, pseudo: PseudoLabelScore) -> dict[str, float]:
        self.model.train()
        self._begin_graph_step()
        labeled = self._labeled_batch()
        unlabeled, hidden = self._unlabeled_batch() if self.use_unlabeled else (None, None)
        with self._autocast():
            out: StepOutput = self._training_step(labeled, unlabeled, step)
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(
                f"method {self.method_name!r}: loss is {out.loss.item()} at step {step} "
                f"(epoch {step // self.loop.steps_per_epoch}); lower train.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.loop.grad_clip > 0:
            owned = (p for m in self.method.trained_modules() for p in m.parameters())
            nn.utils.clip_grad_norm_([*self.model.parameters(), *owned], self.loop.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_optimizer_step(step)
        if out.pseudo_label is not None and hidden is not None:
            pseudo.update(out.pseudo_label, out.pseudo_used, hidden)
        return {"loss": out.loss.item(), **out.logs}

    def run_epoch(self, epoch: int) -> dict[str, float]:
        pseudo = PseudoLabelScore(len(self.classes))
        logs: dict[str, list[float]] = {}
        steps = self.loop.steps_per_epoch
        with self._ambient_rng():
            self.method.on_epoch_start(epoch)
            for i in range(steps):
                for key, value in self.train_step(epoch * steps + i, pseudo).items():
                    logs.setdefault(key, []).append(value)
        metrics = {f"train/{k}": float(np.mean(v)) for k, v in logs.items()}
        metrics.update(pseudo.compute())
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        model.eval()
        preds = []
        for start in range(0, len(images), 32):
            self._begin_graph_step()
            with self._autocast():
                preds.append(model(self._layout(images[start:start + 32])).argmax(1))
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    def evaluate(self, part: Subset, prefix: str) -> Scores:
        """Scores under `prefix/` (val, test, test_final): per 2D image, or for a volume dataset
        per 3D case, with the 2D scores kept under `prefix2d/` (semiseg.volume_metrics)."""
        pred = self.predict(unwrap(self.method.eval_model()), part.images)
        acc = MetricAccumulator(self.classes)
        pred_cpu, masks = pred.cpu(), part.masks.cpu()
        acc.update(pred_cpu, masks)
        if self.volumes is None:
            metrics = {f"{prefix}/{k}": v for k, v in acc.compute().items()}
            return Scores(metrics, pred, acc.per_image("dice"))
        per_case, cases = volume_metrics(pred_cpu, masks, part.index, self.volumes, self.classes)
        metrics = {f"{prefix}/{k}": v for k, v in per_case.items()}
        metrics.update({f"{prefix}2d/{k}": v for k, v in acc.compute().items()})
        return Scores(metrics, pred, acc.per_image("dice"), cases)
