"""train.strong_blur_p reaches every strong view: the Batch views the trainer draws and the
second view unimatch draws itself. Off (0) changes only the blur: the weak views, the batches and
every other draw stay those of the default run, so the ablation in docs/RESULTS.md is paired."""

from __future__ import annotations

import pytest
import torch

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.data.transforms import BLUR_P
from semiseg.engine import Trainer, build_trainer

TINY = [
    "data.image_size=16", "data.num_images=30", "data.batch_size=8", "data.label_fraction=0.3",
    "model.base_channels=4", "model.depth=1", "train.epochs=1", "train.steps_per_epoch=2",
    "train.device=cpu", "method.name=unimatch",
]
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def trainer(*overrides: str) -> Trainer:
    cfg = load_config(None, [*TINY, *overrides])
    data = load_dataset(cfg.data)
    return build_trainer(cfg, data, make_split(data, cfg.data, cfg.train.seed), CPU)


def test_blur_off_changes_only_the_blurred_strong_views() -> None:
    default, off = trainer(), trainer("train.strong_blur_p=0")
    assert default.method.strong_blur_p == BLUR_P and off.method.strong_blur_p == 0.0
    for _ in range(2):  # two steps' batches: the streams stay in step
        (a, _), (b, _) = default._unlabeled_batch(), off._unlabeled_batch()
        assert torch.equal(a.image, b.image) and torch.equal(a.index, b.index)
        same = (a.strong == b.strong).flatten(1).all(1)
        assert same.any() and not same.all()  # blur_p 0.5: some views blurred, some not
        la, lb = default._labeled_batch(), off._labeled_batch()
        assert torch.equal(la.image, lb.image) and torch.equal(la.mask, lb.mask)
