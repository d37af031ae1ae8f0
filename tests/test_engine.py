"""The training engine on CPU with tiny configs: build_trainer, results (test and test_final
metrics, per-image Dice), callbacks, checkpoints and resume,
divergence, determinism; plus the LR schedule and the pseudo-label score."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import Config, load_config
from semiseg.data import SegData, load_dataset
from semiseg.data.splits import Split, make_split
from semiseg.engine import (CHECKPOINT_FILE, FitResult, TrainingDiverged, build_trainer, fit,
                            resolve_device)
from semiseg.errors import SemisegError
from semiseg.optim import build_optimizer, build_scheduler, lr_factor
from semiseg.pseudo_quality import PseudoLabelScore

TINY = [
    "data.image_size=32", "data.num_images=40", "data.batch_size=4", "data.label_fraction=0.25",
    "model.base_channels=4", "model.depth=2",
    "train.epochs=2", "train.steps_per_epoch=3", "train.device=cpu",
]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def dataset() -> tuple[SegData, Split]:
    cfg = tiny()
    data = load_dataset(cfg.data)
    return data, make_split(data, cfg.data, cfg.train.seed)


class Recorder:
    """Records every callback call, and what the checkpoint held when on_epoch_end ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.epochs: list[int] = []
        self.metrics: list[dict[str, float]] = []
        self.dirs: list[Path | None] = []
        self.saved_epoch: list[int] = []
        self.results: list[FitResult] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.calls.append("epoch")
        self.epochs.append(epoch)
        self.metrics.append(dict(metrics))
        self.dirs.append(checkpoint_dir)
        if checkpoint_dir is not None and (checkpoint_dir / CHECKPOINT_FILE).is_file():
            state = torch.load(checkpoint_dir / CHECKPOINT_FILE, weights_only=True)
            self.saved_epoch.append(state["epoch"])

    def on_fit_end(self, result: FitResult) -> None:
        self.calls.append("fit")
        self.results.append(result)


class Stop(Exception):
    pass


class StopAfter(Recorder):
    """Simulates a crash right after epoch `epoch` was checkpointed."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        super().on_epoch_end(epoch, metrics, checkpoint_dir)
        if epoch == self.stop_epoch:
            raise Stop(epoch)


# ---- fit -------------------------------------------------------------------------------------


def test_fit_results_and_callbacks(dataset, tmp_path: Path) -> None:
    data, split = dataset
    cfg = tiny()
    rec = Recorder()
    result = fit(build_trainer(cfg, data, split, CPU), tmp_path / "run", callbacks=[rec])

    assert isinstance(result, FitResult)
    assert 0 <= result.best_epoch < cfg.train.epochs
    assert math.isfinite(result.best_val_dice) and 0.0 <= result.best_val_dice <= 1.0
    assert "test/dice_mean" in result.test_metrics
    for name in data.classes[1:]:
        assert f"test/dice/{name}" in result.test_metrics
    assert "test/dice/background" not in result.test_metrics
    for key in ["test/dice_mean", *(f"test/dice/{n}" for n in data.classes[1:])]:
        assert math.isfinite(result.test_metrics[key]), key
        assert 0.0 <= result.test_metrics[key] <= 1.0
    assert len(result.examples) == min(cfg.tracking.overlays, len(split.test))
    # the last epoch's model is scored too, under test_final/
    assert {k.replace("test/", "test_final/", 1) for k in result.test_metrics if k.startswith("test/")} \
        == {k for k in result.test_metrics if k.startswith("test_final/")}
    # per-image Dice of the selected model, one row per test image, averaging to the test metrics
    assert [row["id"] for row in result.per_image] == [data.ids[i] for i in split.test]
    for name in data.classes[1:]:
        column = np.array([row[f"dice/{name}"] for row in result.per_image])
        assert np.nanmean(column) == pytest.approx(result.test_metrics[f"test/dice/{name}"])
    for row in result.per_image:
        scored = [row[f"dice/{n}"] for n in data.classes[1:] if not math.isnan(row[f"dice/{n}"])]
        assert row["dice_mean"] == pytest.approx(np.mean(scored))
    for ex in result.examples:
        assert ex["image"].shape == ex["mask"].shape == ex["pred"].shape == (32, 32)
        assert ex["id"] in {data.ids[i] for i in split.test}

    # callbacks: one on_epoch_end per epoch, in order, then on_fit_end once
    assert rec.calls == ["epoch"] * cfg.train.epochs + ["fit"]
    assert rec.epochs == list(range(cfg.train.epochs))
    assert all(d == tmp_path / "run" for d in rec.dirs)
    # the checkpoint is written before the callbacks see the epoch
    assert rec.saved_epoch == [e + 1 for e in rec.epochs]
    assert rec.results == [result]
    for epoch, m in zip(rec.epochs, rec.metrics):
        assert m["epoch"] == epoch
        assert math.isfinite(m["train/loss"]) and m["train/loss"] > 0
        assert math.isfinite(m["val/dice_mean"])
        steps_done = (epoch + 1) * cfg.train.steps_per_epoch
        total = cfg.train.epochs * cfg.train.steps_per_epoch
        assert m["lr"] == pytest.approx(cfg.train.lr * lr_factor("cosine", steps_done, total))
    # model selection: the best epoch is the one with the highest val dice (first on ties)
    val = [m["val/dice_mean"] for m in rec.metrics]
    assert result.best_epoch == int(np.argmax(val))
    assert result.best_val_dice == pytest.approx(max(val))


def test_deterministic(dataset, tmp_path: Path) -> None:
    data, split = dataset
    runs = []
    for name in ("a", "b"):
        rec = Recorder()
        fit(build_trainer(tiny("train.epochs=1"), data, split, CPU), tmp_path / name,
            callbacks=[rec])
        runs.append(rec.metrics[0])
    assert runs[0]["train/loss"] == runs[1]["train/loss"]
    assert runs[0]["val/dice_mean"] == runs[1]["val/dice_mean"]
    # and the seed matters
    rec = Recorder()
    fit(build_trainer(tiny("train.epochs=1", "train.seed=1"), data, split, CPU), tmp_path / "c",
        callbacks=[rec])
    assert rec.metrics[0]["train/loss"] != runs[0]["train/loss"]


def test_build_trainer_seeds_weights_without_touching_global_rng(dataset) -> None:
    """The same initial weights on every build (rank, rerun) whatever the global RNG holds,
    different ones for another train.seed; the caller's global RNG stream is left as it was."""
    data, split = dataset
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = build_trainer(tiny(), data, split, CPU)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1000)  # the global RNG moves on; the next build must not care
    again = build_trainer(tiny(), data, split, CPU, rank=1)
    other = build_trainer(tiny("train.seed=1"), data, split, CPU)
    weights = [list(t.model.state_dict().values()) for t in (first, again, other)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))
    assert first.method.total_steps == first.loop.total_steps == 2 * 3
    # ... while each rank draws its own batches
    assert not torch.equal(first.streams.labeled.next(), again.streams.labeled.next())


def test_resume_continues_exactly(dataset, tmp_path: Path) -> None:
    data, split = dataset
    cfg = tiny()
    straight = Recorder()
    full = fit(build_trainer(cfg, data, split, CPU), tmp_path / "a", callbacks=[straight])
    assert straight.epochs == [0, 1]

    crashed = StopAfter(0)
    with pytest.raises(Stop):
        fit(build_trainer(cfg, data, split, CPU), tmp_path / "b", callbacks=[crashed])
    assert crashed.epochs == [0]
    assert (tmp_path / "b" / CHECKPOINT_FILE).is_file()
    assert crashed.metrics[0]["train/loss"] == pytest.approx(straight.metrics[0]["train/loss"], rel=1e-5)

    resumed = Recorder()
    result = fit(build_trainer(cfg, data, split, CPU), tmp_path / "b", callbacks=[resumed],
                 resume_from=tmp_path / "b")
    assert resumed.epochs == [1]  # epoch 0 is not run again
    assert resumed.calls == ["epoch", "fit"]
    for key in ("train/loss", "val/dice_mean", "lr"):
        assert resumed.metrics[0][key] == pytest.approx(straight.metrics[1][key], rel=1e-5), key
    assert result.best_epoch == full.best_epoch
    assert result.test_metrics["test/dice_mean"] == pytest.approx(
        full.test_metrics["test/dice_mean"], rel=1e-5, abs=1e-8)


def test_resume_finished_run_runs_no_epoch(dataset, tmp_path: Path) -> None:
    data, split = dataset
    cfg = tiny("train.epochs=1")
    first = fit(build_trainer(cfg, data, split, CPU), tmp_path / "a")
    rec = Recorder()
    again = fit(build_trainer(cfg, data, split, CPU), tmp_path / "a", callbacks=[rec],
                resume_from=tmp_path / "a")
    assert rec.calls == ["fit"]
    assert again.best_epoch == first.best_epoch
    assert again.test_metrics["test/dice_mean"] == pytest.approx(first.test_metrics["test/dice_mean"])


def test_checkpoint_from_other_config_refused(dataset, tmp_path: Path) -> None:
    data, split = dataset
    fit(build_trainer(tiny("train.epochs=1"), data, split, CPU), tmp_path / "a")
    rec = Recorder()
    with pytest.raises(SemisegError, match="different config"):
        fit(build_trainer(tiny("train.epochs=1", "train.seed=1"), data, split, CPU), tmp_path / "b",
            callbacks=[rec], resume_from=tmp_path / "a")
    assert rec.calls == []


def test_missing_checkpoint(dataset, tmp_path: Path) -> None:
    data, split = dataset
    with pytest.raises(SemisegError, match="cannot read checkpoint"):
        fit(build_trainer(tiny("train.epochs=1"), data, split, CPU), tmp_path / "a",
            resume_from=tmp_path / "nothing")


def test_diverging_lr_raises(dataset, tmp_path: Path) -> None:
    data, split = dataset
    rec = Recorder()
    with pytest.raises(TrainingDiverged) as info:
        fit(build_trainer(tiny("train.lr=1.0e30", "train.grad_clip=0"), data, split, CPU), tmp_path / "a",
            callbacks=[rec])
    msg = str(info.value)
    assert "supervised" in msg
    assert "step" in msg and "train.lr" in msg
    assert rec.calls == []
    assert isinstance(info.value, SemisegError)


def test_nan_images_raise_at_step_0(dataset, tmp_path: Path) -> None:
    data, split = dataset
    images = data.images.copy()
    images[:, 5:9, 5:9] = np.nan
    bad = SegData(images, data.masks, data.groups, data.ids, data.classes, "nan-data")
    with pytest.raises(TrainingDiverged, match=r"'supervised'.*at step 0\b"):
        fit(build_trainer(tiny(), bad, split, CPU), tmp_path / "a")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(SemisegError, match="train.device"):
            resolve_device("cuda")


# ---- LR schedule -----------------------------------------------------------------------------


def test_lr_factor_cosine() -> None:
    assert lr_factor("cosine", 0, 100) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 150, 100) == pytest.approx(0.0, abs=1e-12)  # clamped
    values = [lr_factor("cosine", s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_factor_poly() -> None:
    assert lr_factor("poly", 0, 100) == pytest.approx(1.0)
    assert lr_factor("poly", 50, 100) == pytest.approx(0.5 ** 0.9)
    assert lr_factor("poly", 100, 100) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor("poly", s, 100) for s in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_lr_factor_constant() -> None:
    assert {lr_factor("constant", s, 100) for s in (0, 1, 50, 100, 200)} == {1.0}


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_scheduler_follows_lr_factor(schedule: str, optimizer: str) -> None:
    cfg = load_config(None, [f"train.schedule={schedule}", f"train.optimizer={optimizer}",
                             "train.lr=0.1"]).train
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], cfg)
    assert type(opt).__name__.lower() == optimizer
    sched = build_scheduler(opt, cfg, total_steps=10)
    for step in range(10):
        assert sched.get_last_lr()[0] == pytest.approx(0.1 * lr_factor(schedule, step, 10))
        param.grad = torch.ones(3)
        opt.step()
        sched.step()


# ---- pseudo-label score ----------------------------------------------------------------------


def _labels(seed: int = 0, shape=(4, 16, 16), k: int = 3) -> torch.Tensor:
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed))


def test_pseudo_score_perfect() -> None:
    score = PseudoLabelScore(3)
    hidden = _labels()
    score.update(hidden.clone(), None, hidden)
    out = score.compute()
    assert out["pseudo/dice"] == pytest.approx(1.0)
    assert out["pseudo/coverage"] == pytest.approx(1.0)


def test_pseudo_score_half_used() -> None:
    score = PseudoLabelScore(3)
    hidden = _labels()
    used = torch.zeros_like(hidden, dtype=torch.bool)
    used[..., :8] = True
    wrong = (hidden + 1) % 3
    pseudo = torch.where(used, hidden, wrong)  # right where used, wrong elsewhere
    score.update(pseudo, used, hidden)
    out = score.compute()
    assert out["pseudo/coverage"] == pytest.approx(0.5)
    assert out["pseudo/dice"] == pytest.approx(1.0)  # only used pixels are scored


def test_pseudo_score_all_wrong_and_accumulates() -> None:
    score = PseudoLabelScore(3)
    hidden = _labels()
    score.update((hidden + 1) % 3, None, hidden)
    assert score.compute()["pseudo/dice"] == pytest.approx(0.0)
    score.update(hidden, torch.zeros_like(hidden, dtype=torch.bool), hidden)
    assert score.compute()["pseudo/coverage"] == pytest.approx(0.5)


def test_pseudo_score_empty() -> None:
    assert PseudoLabelScore(3).compute() == {}
