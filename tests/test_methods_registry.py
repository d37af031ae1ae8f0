"""Every registered method, parametrized over METHODS so a new method file is covered the moment
it is added:

- two optimizer steps on random batches give finite losses and change the weights;
- the loss sends gradient to every student parameter;
- `training_step(labeled, None, step)` works when `uses_unlabeled` is False;
- methods with `uses_unlabeled = True` must expose `unlabeled_loss(unlabeled, step) -> Tensor`
  (the unlabeled term alone, no labeled images). It is called at a late step (so ramp-ups are
  on), backpropagated alone, and must give some student parameter a nonzero, finite gradient:
  a method whose unlabeled batch silently does nothing fails here. Such methods must also log
  "loss_unsup" in `StepOutput.logs`;
- `eval_model()` is a module and `state_dict()`/`load_state_dict()` round-trip (e.g. a teacher);
  it is the student exactly when `evaluates == "student"`;
- the constructor stores `total_steps`;
- `stages(cfg)` is plain data that can run and ends in a TrainStage of the method itself, and
  `identity_sections` name config sections;
- the default Config builds from `{}` and unknown params are refused.

Multi-stage methods are built like any other: the params their last stage reads from earlier
stages (e.g. sam_refined's manifest) come from the `stage_inputs` fixture (tests/conftest.py),
and unlabeled batches carry the method's `fixed_targets` as the engine hands them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from semiseg.config import Config, MethodConfig
from semiseg.errors import ConfigError
from semiseg.methods import (METHODS, Batch, Method, PseudoLabelStage, StepOutput, TrainStage,
                             method_config)
from semiseg.methods.stages import check_stages
from semiseg.models import create_model

NUM_CLASSES = 4
NAMES = METHODS.names()


def make_batch(seed: int, labeled: bool, n: int = 4, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, size, size, generator=g)
    strong = image + 0.1 * torch.randn(n, 1, size, size, generator=g)
    mask = torch.randint(0, NUM_CLASSES, (n, size, size), generator=g) if labeled else None
    return Batch(image, strong, mask, torch.arange(n))


def unlabeled_batch(method: Method, seed: int) -> Batch:
    """An unlabeled batch as the engine hands it: with the method's fixed targets, if any."""
    batch = make_batch(seed, labeled=False)
    batch.fixed_target = method.fixed_targets(batch.index)
    return batch


@pytest.fixture
def build(stage_inputs):
    """build(name) -> (model, method): a small U-Net and the method with its default params
    plus whatever its last stage reads from earlier stages."""

    def make(name: str, **kwargs) -> tuple[nn.Module, Method]:
        torch.manual_seed(0)
        model = create_model("unet", 1, NUM_CLASSES, base_channels=4, depth=2)
        params = stage_inputs(name, range(8), (32, 32), NUM_CLASSES)
        method = METHODS.get(name)(model, method_config(name, params), NUM_CLASSES, **kwargs)
        return model, method

    return make


def test_registry_not_empty() -> None:
    assert "supervised" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_registered_under_its_name(name: str) -> None:
    cls = METHODS.get(name)
    assert issubclass(cls, Method)
    assert cls.name == name
    assert isinstance(cls.uses_unlabeled, bool)
    assert isinstance(cls.evaluates, str) and cls.evaluates
    if cls.uses_unlabeled:
        assert cls.unlabeled_loss is not Method.unlabeled_loss, (
            f"{name}: methods with uses_unlabeled=True must implement unlabeled_loss(unlabeled, step)")


@pytest.mark.parametrize("name", NAMES)
def test_stages_are_plain_data_that_can_run(name: str) -> None:
    cfg = Config(method=MethodConfig(name))
    stages = METHODS.get(name).stages(cfg)
    check_stages(stages, name)
    assert all(type(s) in (TrainStage, PseudoLabelStage) for s in stages)
    assert all(dataclasses.is_dataclass(s) for s in stages)
    last = stages[-1]
    assert last.method == name  # the trial's model is the method's own
    for stage in stages:
        if isinstance(stage, TrainStage):
            method_config(stage.method, stage.params)  # every stage's params are valid


@pytest.mark.parametrize("stages, expected", [
    ([], "none; expected at least one TrainStage"),
    ([TrainStage("supervised", name="a"), PseudoLabelStage("p", model="a")],
     "the last is PseudoLabelStage; expected a TrainStage"),
    ([TrainStage("x", inputs={"manifest": "p"})], "stage '' reads 'p', which no earlier stage outputs"),
    ([TrainStage("supervised", name="a"), PseudoLabelStage("p", model="a"),
      PseudoLabelStage("q", model="p"), TrainStage("x")], "needs a model from a TrainStage, not 'p'"),
    ([TrainStage("supervised", name="a"), TrainStage("x", name="a")], "two stages are named 'a'"),
])
def test_stages_that_cannot_run_are_refused(stages, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_stages(stages, "x")


@pytest.mark.parametrize("name", NAMES)
def test_identity_sections_are_config_sections(name: str) -> None:
    sections = METHODS.get(name).identity_sections
    assert isinstance(sections, tuple)
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(sections) <= fields - {"data", "model", "method", "train"}, sections
    cfg = Config(method=MethodConfig(name))
    assert set(cfg.identity()) == {"data", "model", "method", "train", *sections}


@pytest.mark.parametrize("name", NAMES)
def test_stores_total_steps(build, name: str) -> None:
    _, method = build(name, total_steps=123)
    assert method.total_steps == 123


@pytest.mark.parametrize("name", NAMES)
def test_two_training_steps(build, name: str) -> None:
    model, method = build(name)
    cls = type(method)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    model.train()
    method.on_epoch_start(0)
    for step in range(2):
        labeled = make_batch(step, labeled=True)
        unlabeled = unlabeled_batch(method, 100 + step)
        out = method.training_step(labeled, unlabeled, step)
        assert isinstance(out, StepOutput)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss), out.loss
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.logs.values()), out.logs
        if cls.uses_unlabeled:
            assert "loss_unsup" in out.logs
        if out.pseudo_label is not None:
            assert out.pseudo_label.shape == (4, 32, 32)  # one label per unlabeled pixel
            if out.pseudo_used is not None:
                assert out.pseudo_used.shape == out.pseudo_label.shape
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters()
                       if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, f"no finite gradient reaches {missing[:5]}"
            zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
            assert not zero, f"zero gradient on {zero[:5]}"
        opt.step()
        method.after_optimizer_step(step)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_without_unlabeled_batch(build, name: str) -> None:
    """The engine passes unlabeled=None when a method does not use unlabeled images, and to
    every method when the label fraction is 1.0 (no unlabeled images exist)."""
    model, method = build(name)
    model.train()
    method.on_epoch_start(0)
    out = method.training_step(make_batch(0, labeled=True), None, 0)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def sharpen(model: nn.Module, gain: float = 30.0) -> None:
    """Scale the classifier so an untrained model is confident somewhere: methods that keep only
    confident pixels (thresholds up to 0.95, e.g. unimatch's clean + perturbed pass) then have
    pixels to learn from, and the test checks the wiring for every method alike."""
    with torch.no_grad():
        model.head.weight.mul_(gain)


@pytest.mark.parametrize("name", NAMES)
def test_unlabeled_term_trains_the_student(build, name: str) -> None:
    model, method = build(name)
    sharpen(model)
    if not type(method).uses_unlabeled:
        pytest.skip(f"{name} does not use unlabeled images")
    model.train()
    # warm up any state (EMA teacher, banks) with one ordinary step first
    method.on_epoch_start(0)
    warm = method.training_step(make_batch(0, labeled=True), unlabeled_batch(method, 1), 0)
    warm.loss.backward()
    method.after_optimizer_step(0)
    model.zero_grad(set_to_none=True)

    loss = method.unlabeled_loss(unlabeled_batch(method, 2), step=1000)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, f"{name}: the unlabeled loss sends no gradient to the student"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), f"{name}: the unlabeled gradient is all zero"


@pytest.mark.parametrize("name", NAMES)
def test_eval_model_and_state_round_trip(build, name: str) -> None:
    model, method = build(name)
    assert isinstance(method.eval_model(), nn.Module)
    is_student = method.eval_model() is model
    assert is_student == (type(method).evaluates == "student"), (
        f"{name}: evaluates={type(method).evaluates!r} must say whether eval_model() is the student")
    x = make_batch(0, labeled=False).image
    method.eval_model().eval()
    with torch.no_grad():
        assert method.eval_model()(x).shape == (4, NUM_CLASSES, 32, 32)

    # train a step so any extra state (e.g. an EMA teacher) moves away from its initial value
    model.train()
    out = method.training_step(make_batch(0, labeled=True), unlabeled_batch(method, 1), 0)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    method.after_optimizer_step(0)
    state = copy.deepcopy(method.state_dict())
    assert isinstance(state, dict)
    eval_state = copy.deepcopy(method.eval_model().state_dict())

    model2, method2 = build(name)
    model2.load_state_dict(model.state_dict())
    method2.load_state_dict(state)
    restored = method2.state_dict()
    assert restored.keys() == state.keys()
    _assert_same(state, restored)
    _assert_same(eval_state, method2.eval_model().state_dict())


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", NAMES)
def test_method_config(name: str) -> None:
    cfg = method_config(name, {})
    assert type(cfg) is METHODS.get(name).Config
    with pytest.raises(ConfigError, match="no_such_param"):
        method_config(name, {"no_such_param": 1})


def test_distributed_names_no_method() -> None:
    """The trial runner is generic: a method's stages, not a branch on its name, decide what a
    trial runs, so no registered method name appears in semiseg/distributed/."""
    import semiseg.distributed

    for path in Path(semiseg.distributed.__file__).parent.glob("*.py"):
        text = path.read_text()
        named = [n for n in NAMES if re.search(rf"(?<![\w-]){n}(?![\w-])", text)]  # not semi-supervised
        assert not named, f"{path} names {named}"


_IMPORT_PROBE = """
import json, sys
import semiseg.methods
after_methods = {m: m in sys.modules for m in ("ray", "mlflow")}
import semiseg.engine
after_engine = {m: m in sys.modules for m in ("ray", "mlflow")}
print(json.dumps({"methods": after_methods, "engine": after_engine}))
"""


@pytest.fixture(scope="module")
def imported() -> dict[str, dict[str, bool]]:
    """Which of ray / mlflow a fresh interpreter holds after importing the methods, then the
    engine (one subprocess for all the checks below)."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_methods_do_not_import_ray_or_mlflow(imported) -> None:
    assert imported["methods"] == {"ray": False, "mlflow": False}


def test_engine_does_not_import_ray(imported) -> None:
    assert imported["engine"]["ray"] is False


def test_engine_does_not_import_mlflow(imported) -> None:
    assert imported["engine"]["mlflow"] is False
