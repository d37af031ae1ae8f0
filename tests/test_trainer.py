"""Trainer and fit with parts built by hand: a method of a few lines, a 1x1-conv model and tiny
tensors, no Config and no dataset. Checks what the engine does around any method: selection
on val, test metrics of the selected and of the last model, per-image Dice, and the random
stream a method's own code draws from (reproducible, resumable, the caller's left alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.data.sampling import RandomBatches, SplitTensors, Subset
from semiseg.engine import FitResult, LoopSettings, RandomStreams, Trainer, fit
from semiseg.methods.base import Batch, Method, NoParams, StepOutput
from semiseg.metrics import segmentation_metrics

CLASSES = ["background", "spot"]
IDS = [f"img{i:02d}" for i in range(20)]


class CrossEntropy(Method):
    """Plain cross-entropy on the labeled batch, times a factor in [0.5, 1.5) drawn from torch's
    global RNG (as method code such as pixel sampling does), logged so tests can see the draws.
    From epoch `unlearn_from` on it trains on inverted masks, so the model gets worse."""

    uses_unlabeled = False
    unlearn_from = 10**9

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        factor = torch.rand(())
        target = 1 - labeled.mask if self.epoch >= self.unlearn_from else labeled.mask
        loss = F.cross_entropy(self.model(labeled.image), target) * (0.5 + factor)
        return StepOutput(loss, {"factor": factor.item()})

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch


class Unlearns(CrossEntropy):
    unlearn_from = 1


def spots(first: int, n: int, with_masks: bool = True) -> Subset:
    """Images whose bright pixels are the class-1 "spots", dataset indices first..first+n-1."""
    gen = torch.Generator().manual_seed(first)
    masks = (torch.rand(n, 8, 8, generator=gen) > 0.6).long()
    images = (2.0 * masks - 1 + 0.3 * torch.randn(n, 8, 8, generator=gen))[:, None]
    return Subset(images, masks if with_masks else None, torch.arange(first, first + n))


def hand_built(method_cls: type[Method] = CrossEntropy, epochs: int = 2, ambient_seed: int = 0) -> Trainer:
    model = nn.Conv2d(1, 2, kernel_size=1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    method = method_cls(model, NoParams(), len(CLASSES), total_steps=epochs * 5)
    tensors = SplitTensors(labeled=spots(0, 8), unlabeled=spots(8, 4, with_masks=False),
                           val=spots(12, 4), test=spots(16, 4), hidden_unlabeled_masks=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    streams = RandomStreams(RandomBatches(8, 4, 0), RandomBatches(4, 4, 1),
                            torch.Generator().manual_seed(2),
                            ambient=[torch.Generator().manual_seed(ambient_seed).get_state()])
    loop = LoopSettings(epochs=epochs, steps_per_epoch=5, overlays=2, run_hash="hand-built")
    return Trainer(model, method, tensors, optimizer, scheduler, streams, CLASSES, IDS, loop)


class Crash(Exception):
    pass


class Epochs:
    def __init__(self, stop_after: int | None = None) -> None:
        self.metrics: list[dict[str, float]] = []
        self.stop_after = stop_after

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.metrics.append(metrics)
        if epoch == self.stop_after:
            raise Crash(epoch)  # right after the epoch was checkpointed

    def on_fit_end(self, result: FitResult) -> None:
        pass


def test_fit_runs_a_hand_written_method(tmp_path: Path) -> None:
    trainer, rec = hand_built(), Epochs()
    before = torch.get_rng_state()
    result = fit(trainer, tmp_path, callbacks=[rec])
    assert torch.equal(torch.get_rng_state(), before)  # the method's draws came from elsewhere
    factors = [m["train/factor"] for m in rec.metrics]
    assert len(set(factors)) == 2 and all(0.0 <= f < 1.0 for f in factors)
    assert result.best_val_dice > 0.9  # a 1x1 conv learns "bright = spot"
    for prefix in ("test", "test_final"):
        assert 0.9 < result.test_metrics[f"{prefix}/dice_mean"] <= 1.0
        assert f"{prefix}/dice/spot" in result.test_metrics
    assert [row["id"] for row in result.per_image] == IDS[16:]
    assert [ex["id"] for ex in result.examples] == IDS[16:18]
    assert all(row["dice_mean"] == row["dice/spot"] for row in result.per_image)  # one class


def _scores(weights: dict[str, torch.Tensor], test: Subset) -> float:
    model = nn.Conv2d(1, 2, kernel_size=1)
    model.load_state_dict(weights)
    with torch.no_grad():
        pred = model(test.images).argmax(1)
    return segmentation_metrics(pred, test.masks, CLASSES)["dice_mean"]


def test_test_final_scores_the_last_epoch_and_test_the_selected(tmp_path: Path) -> None:
    """Epoch 0 learns, epoch 1 unlearns: val selects epoch 0, and test/ and test_final/ are the
    two checkpointed models' test Dice, computed here independently."""
    trainer = hand_built(Unlearns)
    result = fit(trainer, tmp_path)
    assert result.best_epoch == 0
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    test = trainer.tensors.test
    assert result.test_metrics["test/dice_mean"] == pytest.approx(_scores(state["best_model"], test))
    assert result.test_metrics["test_final/dice_mean"] == pytest.approx(_scores(state["model"], test))
    assert result.test_metrics["test_final/dice_mean"] < result.test_metrics["test/dice_mean"] - 0.5
    per_image = [row["dice_mean"] for row in result.per_image]  # of the selected model
    assert sum(per_image) / len(per_image) == pytest.approx(result.test_metrics["test/dice_mean"])


def test_method_rng_is_reproducible_and_resumes_exactly(tmp_path: Path) -> None:
    straight, again, other = Epochs(), Epochs(), Epochs()
    fit(hand_built(), tmp_path / "a", callbacks=[straight])
    fit(hand_built(), tmp_path / "b", callbacks=[again])
    fit(hand_built(ambient_seed=1), tmp_path / "c", callbacks=[other])
    assert straight.metrics == again.metrics
    assert other.metrics[0]["train/factor"] != straight.metrics[0]["train/factor"]

    crashed = Epochs(stop_after=0)
    with pytest.raises(Crash):
        fit(hand_built(), tmp_path / "d", callbacks=[crashed])
    torch.rand(100)  # whatever the process's global RNG did meanwhile
    resumed = Epochs()
    fit(hand_built(ambient_seed=99), tmp_path / "d", callbacks=[resumed], resume_from=tmp_path / "d")
    assert crashed.metrics == straight.metrics[:1]
    assert resumed.metrics == straight.metrics[1:]  # the checkpoint's streams, not the new seed's
