"""The training speed options (train.channels_last, train.compile, train.cuda_graphs) on CPU:
each one's loss curve over 20 steps matches eager's, a compiled model checkpoints with eager's
keys (checkpoints are interchangeable both ways), and cuda_graphs fails clearly without CUDA.

torch.compile runs with backend aot_eager here: inductor takes ~30 s per graph on this CPU and
the code path (`nn.Module.compile`, the compiled step, its stance) is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.config import Config, load_config
from semiseg.data import SegData, load_dataset
from semiseg.data.sampling import RandomBatches, SplitTensors, Subset
from semiseg.data.splits import Split, make_split
from semiseg.engine import LoopSettings, RandomStreams, Trainer, build_trainer
from semiseg.errors import ConfigError
from semiseg.methods.base import Batch, Method, NoParams, StepOutput
from semiseg.methods.common import sigmoid_rampup, unwrap
from semiseg.pseudo_quality import PseudoLabelScore
from semiseg.speed import STEP_WARMUP, SpeedSettings

STEPS = 20
TINY = [
    "data.image_size=16", "data.num_images=30", "data.batch_size=4", "data.label_fraction=0.3",
    "model.base_channels=4", "model.depth=1", "train.epochs=1", f"train.steps_per_epoch={STEPS}",
    "train.device=cpu",
]
AOT = ["train.compile=true", "train.compile_backend=aot_eager"]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: graphs of one test must not serve another's guards."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def dataset() -> tuple[SegData, Split]:
    cfg = tiny()
    data = load_dataset(cfg.data)
    return data, make_split(data, cfg.data, cfg.train.seed)


def built(dataset, *overrides: str) -> Trainer:
    data, split = dataset
    return build_trainer(tiny(*overrides), data, split, CPU)


def loss_curve(trainer: Trainer) -> list[float]:
    score = PseudoLabelScore(len(trainer.classes))
    with trainer._ambient_rng():  # as run_epoch: method code draws from the run's own RNG
        trainer.method.on_epoch_start(0)
        return [trainer.train_step(step, score)["loss"] for step in range(STEPS)]


def assert_same_curve(curve: list[float], eager: list[float]) -> None:
    assert len(curve) == len(eager) == STEPS
    assert curve == pytest.approx(eager, rel=2e-3, abs=1e-4)
    assert eager[-1] < eager[0]  # it trained: a flat curve would match anything flat


def test_channels_last_matches_eager(dataset) -> None:
    eager = loss_curve(built(dataset))
    trainer = built(dataset, "train.channels_last=true")
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert_same_curve(loss_curve(trainer), eager)


def test_compile_matches_eager(dataset) -> None:
    eager = loss_curve(built(dataset))
    trainer = built(dataset, *AOT)
    assert_same_curve(loss_curve(trainer), eager)
    step = trainer._training_step
    assert step.calls == STEPS and step.compiled  # supervised's step stays compiled


class RampedCrossEntropy(Method):
    """Cross-entropy times a sigmoid ramp of the step number, computed in Python as the
    ramped methods do: a new constant, so a new graph, at every step of the ramp."""

    uses_unlabeled = False

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        weight = sigmoid_rampup(step, 100)
        loss = (1.0 + weight) * F.cross_entropy(self.model(labeled.image), labeled.mask)
        return StepOutput(loss, {"weight": weight})


def ramped_trainer(speed: SpeedSettings) -> Trainer:
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(8, 8, 8, generator=gen) > 0.5).long()
    images = (2.0 * masks - 1 + 0.3 * torch.randn(8, 8, 8, generator=gen))[:, None]
    part = Subset(images, masks, torch.arange(8))
    model = nn.Conv2d(1, 2, kernel_size=1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return Trainer(model, RampedCrossEntropy(model, NoParams(), 2, total_steps=STEPS),
                   SplitTensors(part, part, part, part, None), optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                   RandomStreams(RandomBatches(8, 4, 0), RandomBatches(8, 4, 1),
                                 torch.Generator().manual_seed(2)),
                   ["background", "spot"], [f"img{i}" for i in range(8)],
                   LoopSettings(epochs=1, steps_per_epoch=STEPS, speed=speed))


def test_a_step_that_recompiles_every_call_runs_eagerly_after_the_warm_up() -> None:
    from torch._dynamo.utils import counters

    eager = loss_curve(ramped_trainer(SpeedSettings()))
    trainer = ramped_trainer(SpeedSettings(compile=True, compile_backend="aot_eager"))
    counters.clear()
    assert_same_curve(loss_curve(trainer), eager)
    assert trainer._training_step.compiled is False
    # The warm-up's graphs and one of the model alone, not one per step.
    assert counters["stats"]["unique_graphs"] <= STEP_WARMUP + 2


def test_compiled_checkpoints_keep_eager_keys_both_ways(dataset, tmp_path: Path) -> None:
    compiled = built(dataset, *AOT)
    loss_curve(compiled)
    compiled.save(tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    eager = built(dataset)
    eager_keys = set(unwrap(eager.model).state_dict())
    assert set(state["model"]) == eager_keys
    assert not any("_orig_mod" in key for key in state["model"])
    unwrap(eager.model).load_state_dict(state["model"])  # strict: same keys, same shapes
    images = compiled.tensors.val.images
    assert torch.equal(eager.predict(eager.model, images), compiled.predict(compiled.model, images))
    # and back: an eager model's weights load into the compiled one
    unwrap(compiled.model).load_state_dict(unwrap(built(dataset).model).state_dict())


def test_cuda_graphs_without_cuda_is_a_clear_error(dataset) -> None:
    data, split = dataset
    cfg = load_config(None, [*TINY[:-1], "train.device=auto", "train.cuda_graphs=true"])
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs=true .*device is cpu"):
        build_trainer(cfg, data, split, CPU)
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs=true with train\.device=cpu"):
        tiny("train.cuda_graphs=true")
    with pytest.raises(ConfigError, match=r"train\.compile_backend='aot_eager': expected inductor"):
        load_config(None, ["train.cuda_graphs=true", "train.compile_backend=aot_eager"])


def test_unknown_compile_backend_names_the_key(dataset) -> None:
    with pytest.raises(ConfigError, match=r"train\.compile_backend='inductr': expected one of .*inductor"):
        built(dataset, "train.compile=true", "train.compile_backend=inductr")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_match_eager_on_cuda(dataset) -> None:
    data, split = dataset
    cuda = torch.device("cuda")
    fp32 = [*TINY[:-1], "train.device=cuda", "train.amp=false"]
    eager = loss_curve(build_trainer(load_config(None, fp32), data, split, cuda))
    graphs = build_trainer(load_config(None, [*fp32, "train.cuda_graphs=true"]), data, split, cuda)
    assert_same_curve(loss_curve(graphs), eager)
