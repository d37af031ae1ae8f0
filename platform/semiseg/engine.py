"""The training engine: one pure-torch loop for every method. It owns the optimizer, the LR
schedule, AMP, gradient clipping, checkpoints and model selection; a method only returns a
loss. Reporting goes through callbacks, so this module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.checkpoint_io import read_weights_only
from semiseg.config import Config
from semiseg.data.base import SegData
from semiseg.data.sampling import RandomBatches, SplitTensors, Subset, split_tensors
from semiseg.data.splits import Split
from semiseg.data.transforms import strong_photometric, weak_geometric
from semiseg.errors import SemisegError
from semiseg.methods import METHODS, Batch, Method, StepOutput, method_config
from semiseg.methods.common import unwrap
from semiseg.metrics import MetricAccumulator
from semiseg.models import create_model
from semiseg.optim import build_optimizer, build_scheduler
from semiseg.pseudo_quality import PseudoLabelScore

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingDiverged(SemisegError):
    """The loss became NaN or Inf."""


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...

    def on_fit_end(self, result: "FitResult") -> None: ...


@dataclass
class FitResult:
    best_epoch: int
    best_val_dice: float
    test_metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)  # test images for overlays


@dataclass
class LoopState:
    epoch: int = 0            # next epoch to run
    best_val_dice: float = -1.0
    best_epoch: int = -1
    best_model: dict[str, Tensor] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SemisegError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


class Trainer:
    """Builds model, method and optimizer from a Config and runs epochs."""

    def __init__(self, cfg: Config, data: SegData, split: Split, device: torch.device,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0) -> None:
        self.cfg, self.data, self.device, self.rank = cfg, data, device, rank
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and rerun
        model = create_model(cfg.model.name, 1, data.num_classes, cfg.model.base_channels,
                             cfg.model.depth).to(device)
        self.model = wrap_model(model) if wrap_model else model
        method_cls: type[Method] = METHODS.get(cfg.method.name)
        self.method = method_cls(self.model, method_config(cfg.method.name, cfg.method.params),
                                 data.num_classes)
        self.tensors: SplitTensors = split_tensors(data, split, device)
        self.total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
        self.optimizer = build_optimizer(self.model.parameters(), cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        seed = cfg.train.seed * 1000 + rank  # each DDP rank draws different batches
        bs = cfg.data.batch_size
        self.labeled_batches = RandomBatches(len(self.tensors.labeled), bs, seed)
        self.unlabeled_batches = RandomBatches(max(1, len(self.tensors.unlabeled)), bs, seed + 1)
        self.augment_gen = torch.Generator().manual_seed(seed + 2)
        self.state = LoopState()
        self.use_unlabeled = method_cls.uses_unlabeled and len(self.tensors.unlabeled) > 0

    # ---- checkpoints -------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        """Write the full state atomically (temp file, then rename) and return the directory."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "model": unwrap(self.model).state_dict(), "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch, "best_val_dice": self.state.best_val_dice,
            "best_epoch": self.state.best_epoch, "best_model": self.state.best_model,
            "rng": [g.generator.get_state() for g in (self.labeled_batches, self.unlabeled_batches)]
            + [self.augment_gen.get_state()],
            "config_hash": self.cfg.config_hash(),
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
        if state.get("config_hash") != self.cfg.config_hash():
            raise SemisegError(f"checkpoint {path} was written by a different config")
        unwrap(self.model).load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for gen, rng in zip((self.labeled_batches.generator, self.unlabeled_batches.generator,
                             self.augment_gen), state["rng"]):
            gen.set_state(rng.cpu())
        self.state = LoopState(state["epoch"], state["best_val_dice"], state["best_epoch"],
                               state["best_model"])

    # ---- training ----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _labeled_batch(self) -> Batch:
        pick = self.labeled_batches.next()
        part = self.tensors.labeled
        image, mask, _ = weak_geometric(part.images[pick], part.masks[pick], self.augment_gen)
        return Batch(image, strong_photometric(image, self.augment_gen), mask, part.index[pick])

    def _unlabeled_batch(self) -> tuple[Batch, Tensor | None]:
        """An unlabeled batch (no mask) plus the hidden masks warped the same way, for scoring."""
        pick = self.unlabeled_batches.next()
        part = self.tensors.unlabeled
        hidden = self.tensors.hidden_unlabeled_masks
        fixed = self.method.fixed_targets(part.index[pick])
        # +1 so that pixels warped in from outside the image (zeros) read as -1, "no label".
        image, fixed_warped, hidden_warped = weak_geometric(
            part.images[pick], None if fixed is None else fixed.to(self.device) + 1, self.augment_gen,
            extra=None if hidden is None else hidden[pick],
        )
        fixed_warped = None if fixed_warped is None else fixed_warped - 1
        batch = Batch(image, strong_photometric(image, self.augment_gen), None, part.index[pick],
                      fixed_warped)
        return batch, hidden_warped

    def train_step(self, step: int, pseudo: PseudoLabelScore) -> dict[str, float]:
        self.model.train()
        labeled = self._labeled_batch()
        unlabeled, hidden = self._unlabeled_batch() if self.use_unlabeled else (None, None)
        with self._autocast():
            out: StepOutput = self.method.training_step(labeled, unlabeled, step)
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(
                f"method {self.cfg.method.name!r}: loss is {out.loss.item()} at step {step} "
                f"(epoch {step // self.cfg.train.steps_per_epoch}); lower train.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_optimizer_step(step)
        if out.pseudo_label is not None and hidden is not None:
            pseudo.update(out.pseudo_label, out.pseudo_used, hidden)
        return {"loss": out.loss.item(), **out.logs}

    def run_epoch(self, epoch: int) -> dict[str, float]:
        self.method.on_epoch_start(epoch)
        pseudo = PseudoLabelScore(self.data.num_classes)
        logs: dict[str, list[float]] = {}
        steps = self.cfg.train.steps_per_epoch
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
            with self._autocast():
                preds.append(model(images[start:start + 32]).argmax(1))
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    def evaluate(self, part: Subset, prefix: str) -> tuple[dict[str, float], Tensor]:
        pred = self.predict(unwrap(self.method.eval_model()), part.images)
        acc = MetricAccumulator(self.data.classes)
        acc.update(pred.cpu(), part.masks.cpu())
        return {f"{prefix}/{k}": v for k, v in acc.compute().items()}, pred


def fit(cfg: Config, data: SegData, split: Split, device: torch.device, workdir: Path,
        callbacks: list[Callback] = (), resume_from: Path | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
        progress: Callable[[str], None] | None = None) -> FitResult:
    """Train, select the best epoch on val Dice, and score that model on test.

    Every epoch the full state goes to `workdir/checkpoint.pt` (rank 0 only) before callbacks
    see the metrics, so a callback can hand the checkpoint on (e.g. to Ray) and a crash loses
    at most the epoch in progress. `resume_from` continues from such a directory.
    """
    trainer = Trainer(cfg, data, split, device, wrap_model, rank)
    if resume_from is not None:
        trainer.load(resume_from)
    for epoch in range(trainer.state.epoch, cfg.train.epochs):
        metrics = trainer.run_epoch(epoch)
        val_metrics, _ = trainer.evaluate(trainer.tensors.val, "val")
        metrics.update(val_metrics)
        if metrics["val/dice_mean"] > trainer.state.best_val_dice:
            trainer.state.best_val_dice = metrics["val/dice_mean"]
            trainer.state.best_epoch = epoch
            trainer.state.best_model = {
                k: v.detach().clone() for k, v in unwrap(trainer.method.eval_model()).state_dict().items()
            }
        trainer.state.epoch = epoch + 1
        metrics["epoch"] = epoch
        saved = trainer.save(workdir) if rank == 0 else None
        if progress:
            progress(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train/loss']:.4f}  "
                     f"val dice {metrics['val/dice_mean']:.4f}")
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics, saved)
    result = _test(trainer, cfg)
    for cb in callbacks:
        cb.on_fit_end(result)
    return result


def _test(trainer: Trainer, cfg: Config) -> FitResult:
    """Load the model selected on val and score it on the test images."""
    if trainer.state.best_model is not None:
        unwrap(trainer.method.eval_model()).load_state_dict(trainer.state.best_model)
    test_metrics, pred = trainer.evaluate(trainer.tensors.test, "test")
    test = trainer.tensors.test
    examples = [
        {"id": trainer.data.ids[int(test.index[i])], "image": test.images[i, 0].cpu().numpy(),
         "mask": test.masks[i].cpu().numpy(), "pred": pred[i].cpu().numpy()}
        for i in range(min(cfg.tracking.overlays, len(test)))
    ]
    return FitResult(trainer.state.best_epoch, trainer.state.best_val_dice, test_metrics, examples)
