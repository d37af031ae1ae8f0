"""Local contrastive (Chaitanya et al.): the pixel-to-class-mean loss on hand-built embeddings
(exact value, background and sparse classes left out, unlabeled pixels ignored), the stages
(baseline -> rounds, each reading the previous checkpoint), how a round starts from and labels
with its init checkpoint, the cleaning filter, and the projection head and g_xi convolutions
trained through the engine's optimizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.config import Config, MethodConfig, load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.engine import build_trainer
from semiseg.errors import ConfigError, SemisegError
from semiseg.methods import Batch, TrainStage
from semiseg.methods.local_contrastive import (LocalContrastive, LocalContrastiveConfig,
                                               flip_agreement)
from semiseg.methods.local_contrastive_loss import local_contrastive_loss
from semiseg.methods.stages import check_stages
from semiseg.models import create_model, model_options
from semiseg.pseudo_quality import PseudoLabelScore
from semiseg.sam.coarse import load_coarse_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FG = torch.tensor([1, 2])


def two_class_maps(dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """One 4x4 image: left half class 1 embedded on axis 0, right half class 2 on axis 1."""
    labels = torch.ones(1, 4, 4, dtype=torch.long)
    labels[..., 2:] = 2
    z = torch.zeros(1, dim, 4, 4)
    z[:, 0, :, :2], z[:, 1, :, 2:] = 1.0, 1.0
    return z, labels


def loss(z1, y1, z2, y2, classes=FG, t=0.1, positives=3, min_pixels=1):
    return local_contrastive_loss(z1, y1, z2, y2, classes, t, positives, min_pixels)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_exact_value_on_orthogonal_classes(t: float) -> None:
    """Both images of the pair alike, classes on orthogonal axes: every anchor has cosine 1 with
    its class mean in each image and 0 with the other class's, so
    l = 2 (log(2 e^(1/t) + 2) - 1/t) = 2 log(2 + 2 e^(-1/t)). Lengths must not matter."""
    z, y = two_class_maps()
    value, count = loss(z * 3.0, y, z * 0.5, y, t=t)
    assert count == 2 * 2 * 3  # 2 images x 2 classes x 3 anchors
    assert value.item() == pytest.approx(2 * math.log(2 + 2 * math.exp(-1 / t)), rel=1e-5)


def test_matching_pairs_score_lower_than_swapped_classes() -> None:
    z, y = two_class_maps()
    swapped = 3 - y  # the other image calls class 1 what this one calls 2
    good, _ = loss(z, y, z, y)
    bad, _ = loss(z, y, z, swapped)
    assert good < bad - 5.0, (good, bad)


def test_background_and_unlabeled_pixels_are_left_out() -> None:
    """Class 0 (not in `classes`) and -1 pixels neither anchor nor enter a mean: whatever their
    embeddings, the loss is the two-class value; asked to contrast class 0, it changes."""
    z, y = two_class_maps()
    z, y = torch.cat([z, torch.randn(1, 4, 4, 4)], -1), torch.cat([y, torch.zeros(1, 4, 4).long()], -1)
    expected = 2 * math.log(2 + 2 * math.exp(-10))
    assert loss(z, y, z, y)[0].item() == pytest.approx(expected, rel=1e-5)
    unlabeled = y.masked_fill(y == 0, -1)
    assert loss(z, unlabeled, z, unlabeled)[0].item() == pytest.approx(expected, rel=1e-5)
    with_background, _ = loss(z, y, z, y, classes=torch.tensor([0, 1, 2]))
    assert with_background.item() != pytest.approx(expected, rel=1e-3)


def test_class_enters_only_where_both_images_have_enough_pixels() -> None:
    """The second image has 2 pixels of class 2: with min_pixels 3 only class 1 is contrasted,
    so D holds one mean per image: l = 2 log(2) for every class-1 anchor (6 of them)."""
    z, y = two_class_maps()
    y2 = y.clone()
    y2[0, :, 2:] = 1
    y2[0, 0, 2:] = 2
    z2 = z.clone()
    z2[:, :, :, 2:] = 0
    z2[:, 0, 1:, 2:] = 1.0
    value, count = loss(z, y, z2, y2, min_pixels=3)
    assert count == 6
    assert value.item() == pytest.approx(2 * math.log(2), rel=1e-5)


def test_no_contrastable_class_gives_a_zero_that_keeps_the_graph() -> None:
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    value, count = loss(z, torch.zeros(2, 4, 4).long(), z, torch.zeros(2, 4, 4).long())
    assert count == 0 and value.item() == 0.0
    value.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# ---- stages, init checkpoint, labeller --------------------------------------------------------


def test_stages_baseline_then_rounds_each_reading_the_previous() -> None:
    cfg = Config(method=MethodConfig("local_contrastive", {"rounds": 2, "temperature": 0.2}))
    stages = LocalContrastive.stages(cfg)
    check_stages(stages, "local_contrastive")
    assert [(s.method, s.name, s.inputs) for s in stages] == [
        ("supervised", "baseline", {}),
        ("local_contrastive", "round0", {"init": "baseline"}),
        ("local_contrastive", "round1", {"init": "round0"}),
    ]
    assert all(isinstance(s, TrainStage) for s in stages)
    assert stages[-1].params == {"rounds": 2, "temperature": 0.2}


def save(folder: Path, model: nn.Module) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    # the final weights as `model`, the val-selected ones as `best_model`: the latter must be used
    torch.save({"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
                "best_model": model.state_dict()}, folder / CHECKPOINT_FILE)
    return str(folder)


def unet(seg_convs: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("unet", 1, 3, base_channels=4, depth=2, seg_convs=seg_convs)


def build(init: str, seg_convs: bool = True, **params) -> LocalContrastive:
    return LocalContrastive(unet(seg_convs, 0), LocalContrastiveConfig(init=init, **params), 3)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_from_baseline_keeps_fresh_head_and_labels_with_the_baseline(tmp_path: Path) -> None:
    baseline = unet(False, 1)
    method = build(save(tmp_path / "baseline", baseline))
    student, fresh = method.model.state_dict(), unet(True, 0).state_dict()
    for key, value in student.items():
        expected = fresh[key] if key.startswith("head.") else baseline.state_dict()[key]
        assert torch.equal(value, expected), key
    assert model_options(student) == {"seg_convs": True}
    assert same(method.labeller.state_dict(), baseline.state_dict())  # no g_xi: the baseline's net
    assert not method.labeller.training
    assert not any(p.requires_grad for p in method.labeller.parameters())
    x = torch.randn(2, 1, 16, 16)
    unlabeled = Batch(x, x, None, torch.arange(2))
    with torch.no_grad():
        assert torch.equal(method.pseudo_labels(unlabeled), baseline.eval()(x).argmax(1))


def test_later_round_starts_from_the_whole_previous_model(tmp_path: Path) -> None:
    previous = unet(True, 2)
    method = build(save(tmp_path / "round0", previous))
    assert same(method.model.state_dict(), previous.state_dict())
    assert same(method.labeller.state_dict(), previous.state_dict())


def test_init_is_required_and_must_fit_the_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs method.params.init"):
        build("")
    other = create_model("unet", 1, 3, base_channels=8, depth=2)
    with pytest.raises(SemisegError, match="does not fit the model|size mismatch"):
        build(save(tmp_path / "other", other))
    with pytest.raises(SemisegError, match="checkpoint not found"):
        build(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="method.params.rounds=0"):
        LocalContrastiveConfig(rounds=0)


def test_coarse_loader_rebuilds_a_model_with_seg_convs(tmp_path: Path) -> None:
    """Any checkpoint loader (SAM's coarse model, the logged MLflow model) reads g_xi off the
    weights, whichever method asked for it."""
    model = unet(True, 3)
    folder = save(tmp_path / "lc", model)
    cfg = load_config(None, ["model.base_channels=4", "model.depth=2"])
    loaded = load_coarse_model(folder, cfg.model, 3)
    assert same(loaded.state_dict(), model.state_dict())


class ThreeClass(nn.Module):
    """Labels 1 / 2 by the sign of each pixel (`shift` 0, flip-equivariant) or of its left
    neighbour (`shift` 1, not: a flip moves the neighbour to the right)."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.roll(self.shift, -1)
        return torch.cat([torch.full_like(x, -9.0), -x, x], 1)


def test_flip_agreement_cleaning(tmp_path: Path) -> None:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for shift, agrees in ((0, True), (1, False)):
        labeller = ThreeClass(shift)
        labels = labeller(x).argmax(1)
        agreement = flip_agreement(labeller, x, labels, 3)
        assert torch.equal(agreement, torch.ones(3)) if agrees else agreement.max() < 0.9
        method = build(save(tmp_path / "m", unet(True, 0)), min_agreement=0.9)
        method.labeller = labeller
        kept = method.pseudo_labels(Batch(x, x, None, torch.arange(3)))
        assert torch.equal(kept, labels if agrees else torch.full_like(labels, -1))


# ---- through the engine: g_xi in the model, the projection head in the optimizer ----------------


def test_projection_head_and_seg_convs_train_through_the_engine(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.image_size=32", "data.num_images=24", "data.batch_size=2",
                             "model.base_channels=4", "model.depth=2", "train.device=cpu",
                             "data.label_fraction=0.25", "train.grad_clip=1.0"])
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, 0)
    baseline = create_model("unet", 1, data.num_classes, base_channels=4, depth=2)
    with torch.no_grad():  # a labeller that predicts several classes, as a trained one does
        baseline.head.bias.zero_()
        baseline.head.weight.mul_(30.0)
    cfg.method.name = "local_contrastive"
    cfg.method.params = {"init": save(tmp_path / "baseline", baseline), "contrastive_weight": 1.0}
    trainer = build_trainer(cfg, data, split, torch.device("cpu"))
    method = trainer.method
    assert model_options(trainer.model.state_dict()) == {"seg_convs": True}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    head = list(method.projection.parameters())
    assert head and all(id(p) in in_optimizer for p in head)
    before = [p.detach().clone() for p in head]
    seg_convs = trainer.model.head[0][0].weight.detach().clone()
    logs = trainer.train_step(0, PseudoLabelScore(data.num_classes))
    assert logs["loss_unsup"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert all(not torch.equal(a, p) for a, p in zip(before, head))  # the optimizer moved them
    assert not torch.equal(seg_convs, trainer.model.head[0][0].weight)
