"""The training engine: one pure-torch loop for every method. It owns the optimizer, the LR
schedule, AMP, gradient clipping, checkpoints and model selection; a method only returns a
loss. Reporting goes through callbacks, so this module imports neither Ray nor MLflow.

Build, then run (as segment-anything's `build_sam` beside `Sam(...)`): `build_trainer` is the one
place that reads a Config; `Trainer` (semiseg.trainer) receives the built parts; `fit` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.config import Config
from semiseg.data.base import SegData
from semiseg.data.sampling import RandomBatches, split_tensors
from semiseg.data.splits import Split
from semiseg.errors import SemisegError
from semiseg.methods import METHODS, Method, method_config
from semiseg.methods.common import unwrap
from semiseg.models import create_model
from semiseg.optim import build_optimizer, build_scheduler
from semiseg.speed import SpeedSettings, check_speed, to_channels_last
from semiseg.trainer import LoopSettings, RandomStreams, Trainer, TrainingDiverged
from semiseg.volume_metrics import VolumeLayout

__all__ = ["CHECKPOINT_FILE", "Callback", "FitResult", "LoopSettings", "RandomStreams", "Trainer",
           "TrainingDiverged", "build_trainer", "fit", "resolve_device"]


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...

    def on_fit_end(self, result: "FitResult") -> None: ...


@dataclass
class FitResult:
    best_epoch: int
    best_val_dice: float
    test_metrics: dict[str, float]
    """test/... for the model selected on val; test_final/... for the last epoch's model. For a
    volume dataset these are per 3D case (Dice, IoU, HD95 in mm), and test2d/..., test_final2d/...
    the per-slice scores (semiseg.volume_metrics); model selection uses val/dice_mean, per case
    there too."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The first test images (id, image, mask, pred arrays) for overlays."""
    per_image: list[dict[str, Any]] = field(default_factory=list)
    """Per test image, for paired statistics: {"id", "dice/<class>" per foreground class,
    "dice_mean"} of the selected model; NaN where the image excludes a class (semiseg.metrics)."""
    per_case: list[dict[str, Any]] = field(default_factory=list)
    """Volume datasets: per test case of the selected model, {"case", "slices", "spacing_mm",
    "dice/<class>", "iou/<class>", "hd95/<class>" (mm), "dice_mean", "hd95_mean"}."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SemisegError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def build_trainer(cfg: Config, data: SegData, split: Split, device: torch.device,
                  wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0) -> Trainer:
    """Build everything a Trainer runs from the config: the model (seeded by train.seed, the same
    on every rank and rerun; `wrap_model` e.g. wraps it for DDP), the method, the split as device
    tensors, optimizer, LR schedule, and the random streams (batches differ across ranks).
    The speed options (train.channels_last / compile / cuda_graphs) are checked against the device
    first; the Trainer compiles (semiseg.speed)."""
    t = cfg.train
    speed = SpeedSettings(t.channels_last, t.compile, t.compile_backend, t.cuda_graphs)
    check_speed(speed, device)  # before any work: e.g. train.cuda_graphs on a CPU worker
    loop = LoopSettings(t.epochs, t.steps_per_epoch, t.grad_clip, t.amp, cfg.tracking.overlays,
                        cfg.config_hash(), rank, t.strong_blur_p, speed)
    model, method, ambient = _seeded_model_and_method(cfg, data.num_classes, device, wrap_model,
                                                      loop.total_steps, data.in_channels)
    tensors = split_tensors(data, split, device)
    optimizer = build_optimizer(
        [*model.parameters(), *(p for m in method.trained_modules() for p in m.parameters())],
        cfg.train)
    seed, size = cfg.train.seed * 1000 + rank, cfg.data.batch_size
    streams = RandomStreams(RandomBatches(len(tensors.labeled), size, seed),
                            RandomBatches(max(1, len(tensors.unlabeled)), size, seed + 1),
                            torch.Generator().manual_seed(seed + 2),
                            strong=torch.Generator().manual_seed(seed + 3), ambient=ambient)
    return Trainer(model, method, tensors, optimizer,
                   build_scheduler(optimizer, cfg.train, loop.total_steps), streams,
                   data.classes, data.ids, loop, VolumeLayout.from_data(data))


def _seeded_model_and_method(cfg: Config, num_classes: int, device: torch.device,
                             wrap_model: Callable[[nn.Module], nn.Module] | None,
                             total_steps: int,
                             in_channels: int = 1) -> tuple[nn.Module, Method, list[Tensor]]:
    """Model and method built under torch's global RNG seeded with train.seed, in a fork of it:
    the caller's RNG is untouched. Also returns the state that fork ends in, and a CUDA state
    seeded the same way, as the RNG the method draws from in training (RandomStreams.ambient)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.train.seed)
        options = METHODS.get(cfg.method.name).model_options(dict(cfg.method.params))
        model = create_model(cfg.model.name, in_channels, num_classes, cfg.model.base_channels,
                             cfg.model.depth, **options).to(device)
        if cfg.train.channels_last:  # before DDP and before teachers are copied from it
            model = to_channels_last(model)
        model = wrap_model(model) if wrap_model else model
        method = METHODS.get(cfg.method.name)(
            model, method_config(cfg.method.name, cfg.method.params), num_classes,
            total_steps=total_steps)
        method.strong_blur_p = cfg.train.strong_blur_p  # for views a method draws itself
        ambient = [torch.get_rng_state()]
    if device.type == "cuda":
        ambient.append(torch.Generator(device).manual_seed(cfg.train.seed).get_state())
    return model, method, ambient


def fit(trainer: Trainer, workdir: Path, callbacks: Sequence[Callback] = (),
        resume_from: Path | None = None, progress: Callable[[str], None] | None = None) -> FitResult:
    """Train, select the best epoch on val Dice, and score that model (and the last) on test.

    Every epoch the full state goes to `workdir/checkpoint.pt` (rank 0 only) before callbacks
    see the metrics, so a callback can hand the checkpoint on (e.g. to Ray) and a crash loses
    at most the epoch in progress. `resume_from` continues from such a directory.
    """
    if resume_from is not None:
        trainer.load(resume_from)
    epochs = trainer.loop.epochs
    for epoch in range(trainer.state.epoch, epochs):
        metrics = trainer.run_epoch(epoch)
        metrics.update(trainer.evaluate(trainer.tensors.val, "val").metrics)
        _select(trainer, epoch, metrics["val/dice_mean"])
        trainer.state.epoch = epoch + 1
        metrics["epoch"] = epoch
        saved = trainer.save(workdir) if trainer.loop.rank == 0 else None
        if progress:
            progress(f"epoch {epoch + 1}/{epochs}  loss {metrics['train/loss']:.4f}  "
                     f"val dice {metrics['val/dice_mean']:.4f}")
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics, saved)
    result = _test(trainer)
    for cb in callbacks:
        cb.on_fit_end(result)
    return result


def _select(trainer: Trainer, epoch: int, val_dice: float) -> None:
    """Keep a copy of the evaluated model when its val Dice beats every earlier epoch's."""
    state = trainer.state
    if val_dice > state.best_val_dice:
        state.best_val_dice, state.best_epoch = val_dice, epoch
        weights = unwrap(trainer.method.eval_model()).state_dict()
        state.best_model = {k: v.detach().clone() for k, v in weights.items()}


def _test(trainer: Trainer) -> FitResult:
    """Score the last epoch's model on test, then load the model selected on val and score it."""
    test = trainer.tensors.test
    final = trainer.evaluate(test, "test_final").metrics
    if trainer.state.best_model is not None:
        unwrap(trainer.method.eval_model()).load_state_dict(trainer.state.best_model)
    selected = trainer.evaluate(test, "test")
    ids = [trainer.ids[int(i)] for i in test.index]
    examples = [
        {"id": ids[i], "image": test.images[i, 0].cpu().numpy(), "mask": test.masks[i].cpu().numpy(),
         "pred": selected.pred[i].cpu().numpy()}
        for i in range(min(trainer.loop.overlays, len(test)))
    ]
    return FitResult(trainer.state.best_epoch, trainer.state.best_val_dice,
                     {**selected.metrics, **final}, examples,
                     _per_image(ids, trainer.classes, selected.dice), selected.cases)


def _per_image(ids: list[str], classes: list[str], dice: np.ndarray) -> list[dict[str, Any]]:
    """FitResult.per_image rows from (n, C - 1) per-image Dice."""
    rows = []
    for image_id, values in zip(ids, dice):
        row: dict[str, Any] = {"id": image_id}
        row.update({f"dice/{name}": float(v) for name, v in zip(classes[1:], values)})
        scored = values[~np.isnan(values)]
        row["dice_mean"] = float(scored.mean()) if len(scored) else float("nan")
        rows.append(row)
    return rows
