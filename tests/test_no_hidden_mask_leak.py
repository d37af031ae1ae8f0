"""No method can reach the hidden masks of the unlabeled images.

The engine keeps the unlabeled images' masks (`SplitTensors.hidden_unlabeled_masks`) only to
score pseudo-labels. For every registered method this runs real training epochs through the
engine's `Trainer` and checks what the method received and what it kept:

- every unlabeled Batch it is handed has `mask=None` and indices from `split.unlabeled` only,
  and labeled batches come from `split.labeled`, which is disjoint from `split.unlabeled`;
- afterwards, walking everything the method object holds (attributes, dicts, lists, tuples,
  modules' parameters and buffers, dataclasses) finds no tensor sharing storage with the hidden
  masks, no tensor equal to any (non-constant) hidden mask, and no reference to the engine's
  split tensors, dataset or trainer;
- a method is built from (model, cfg, num_classes, total_steps) only.

Multi-stage methods get what their last stage reads from earlier stages from the
`stage_inputs` fixture (tests/conftest.py): for sam_refined, random pseudo-labels.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from semiseg.config import load_config
from semiseg.data import SegData, load_dataset
from semiseg.data.sampling import GatheredRows, SplitTensors, Subset
from semiseg.data.splits import Split, make_split
from semiseg.engine import Trainer, build_trainer
from semiseg.methods import METHODS, Batch, Method
from semiseg.pseudo_quality import PseudoLabelScore

TINY = [
    "data.image_size=32", "data.num_images=40", "data.batch_size=4", "data.label_fraction=0.25",
    "model.base_channels=4", "model.depth=2", "train.epochs=3", "train.steps_per_epoch=3",
    "train.device=cpu",
]
# Three epochs: every method's default params reach its unlabeled path (local_contrastive's first
# pseudo-label refresh is at epoch 2).
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["mapped", "copied"])
def dataset(request) -> tuple[SegData, Split]:
    """Both ways the engine holds a split on the CPU: rows gathered from the mapped cache, and
    tensors copied from an uncached load."""
    cfg = load_config(None, [*TINY, f"data.cache={request.param == 'mapped'}"])
    data = load_dataset(cfg.data)
    assert isinstance(data.images, np.memmap) == (request.param == "mapped")
    split = make_split(data, cfg.data, cfg.train.seed)
    assert split.unlabeled and split.labeled
    return data, split


FORBIDDEN = (SplitTensors, Subset, GatheredRows, np.memmap, SegData, Split, Trainer, PseudoLabelScore)


def as_tensor(rows) -> Tensor:
    """The hidden masks as one tensor (gathered rows are read into a copy)."""
    return rows if isinstance(rows, Tensor) else rows[:]


def walk(obj, path: str, seen: set[int], tensors: list[tuple[str, Tensor]],
         forbidden: list[str]) -> None:
    """Everything reachable from `obj` through containers, modules and semiseg objects."""
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, FORBIDDEN):
        forbidden.append(f"{path}: {type(obj).__name__}")
        return
    if isinstance(obj, Tensor):
        tensors.append((path, obj))
        return
    if isinstance(obj, nn.Module):
        for name, t in obj.named_parameters():
            tensors.append((f"{path}.{name}", t))
        for name, t in obj.named_buffers():
            tensors.append((f"{path}.{name}", t))
        for key, value in vars(obj).items():
            walk(value, f"{path}.{key}", seen, tensors, forbidden)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            walk(key, f"{path}[key]", seen, tensors, forbidden)
            walk(value, f"{path}[{key!r}]", seen, tensors, forbidden)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            walk(value, f"{path}[{i}]", seen, tensors, forbidden)
        return
    if dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("semiseg"):
        for key, value in vars(obj).items():
            walk(value, f"{path}.{key}", seen, tensors, forbidden)
        return
    # Functions and bound methods stored on the method: follow what they close over.
    if isinstance(obj, types.MethodType):
        walk(obj.__self__, f"{path}.__self__", seen, tensors, forbidden)
        walk(obj.__func__, f"{path}.__func__", seen, tensors, forbidden)
    elif isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            walk(value, f"{path}.<closure {i}>", seen, tensors, forbidden)
        walk(obj.__defaults__, f"{path}.__defaults__", seen, tensors, forbidden)
        walk(obj.__kwdefaults__, f"{path}.__kwdefaults__", seen, tensors, forbidden)
    elif isinstance(obj, functools.partial):
        walk((obj.func, obj.args, obj.keywords), f"{path}.<partial>", seen, tensors, forbidden)


def matches_hidden(t: Tensor, hidden: Tensor, informative: Tensor) -> bool:
    """True if t, read as a stack of H x W maps, contains one equal to an informative mask."""
    h, w = hidden.shape[-2:]
    if t.numel() == 0 or t.numel() % (h * w) or t.is_complex():
        return False
    maps = t.detach().reshape(-1, h, w)
    if maps.is_floating_point() and not torch.equal(maps, maps.round()):
        return False
    maps = maps.to(torch.long)
    targets = hidden[informative]
    return bool((maps[:, None] == targets[None]).flatten(2).all(-1).any())


def storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", METHODS.names())
def test_method_constructor_takes_model_cfg_num_classes_total_steps_only(name: str) -> None:
    cls = METHODS.get(name)
    params = list(inspect.signature(cls.__init__).parameters.values())
    assert [p.name for p in params] == ["self", "model", "cfg", "num_classes", "total_steps"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params), params
    assert params[-1].default is not inspect.Parameter.empty  # optional: a ramp's run length


@pytest.mark.parametrize("name", METHODS.names())
def test_no_method_reaches_hidden_masks(name: str, dataset, stage_inputs) -> None:
    data, split = dataset
    inputs = stage_inputs(name, split.unlabeled, data.masks.shape[1:], data.num_classes)
    extra = [f"method.params.{key}={value}" for key, value in inputs.items()]
    cfg = load_config(None, [*TINY, f"method.name={name}", *extra])
    trainer = build_trainer(cfg, data, split, CPU)
    method = trainer.method
    cls = METHODS.get(name)

    # The engine built the method from (model, cfg, num_classes, total_steps), nothing more.
    assert isinstance(method, cls) and isinstance(method, Method)
    assert method.model is trainer.model
    assert type(method.cfg) is cls.Config
    assert method.num_classes == data.num_classes and type(method.num_classes) is int
    assert method.total_steps == cfg.train.epochs * cfg.train.steps_per_epoch

    hidden = as_tensor(trainer.tensors.hidden_unlabeled_masks)
    assert hidden is not None and hidden.shape[0] == len(split.unlabeled)
    assert trainer.tensors.unlabeled.masks is None
    informative = torch.tensor([len(m.unique()) > 1 for m in hidden])
    assert informative.any(), "no hidden mask with more than one class to look for"

    received: list[tuple[Batch, Batch | None]] = []
    original = method.training_step

    def recording_step(labeled, unlabeled, step):
        received.append((labeled, unlabeled))
        return original(labeled, unlabeled, step)

    method.training_step = recording_step
    try:
        for epoch in range(cfg.train.epochs):
            trainer.run_epoch(epoch)
    finally:
        del method.training_step  # drop the recorder (and the batches its closure holds)
    assert len(received) == cfg.train.epochs * cfg.train.steps_per_epoch

    labeled_ids, unlabeled_ids = set(split.labeled), set(split.unlabeled)
    assert not labeled_ids & unlabeled_ids
    batch_fields = {f.name for f in dataclasses.fields(Batch)}
    for labeled, unlabeled in received:
        assert set(labeled.index.tolist()) <= labeled_ids
        assert labeled.mask is not None and storage_ptr(labeled.mask) != storage_ptr(hidden)
        if not cls.uses_unlabeled:
            assert unlabeled is None
            continue
        assert unlabeled is not None
        assert unlabeled.mask is None
        assert set(vars(unlabeled)) == batch_fields  # nothing smuggled alongside
        assert set(unlabeled.index.tolist()) <= unlabeled_ids
        for t in (unlabeled.image, unlabeled.strong):
            assert storage_ptr(t) != storage_ptr(hidden)

    # What the method holds after training.
    tensors: list[tuple[str, Tensor]] = []
    forbidden: list[str] = []
    walk(method, name, set(), tensors, forbidden)
    walk(method.state_dict(), f"{name}.state_dict()", set(), tensors, forbidden)
    assert not forbidden, forbidden
    assert tensors, "the walk found no tensor at all"
    assert any(t is p for _, t in tensors for p in trainer.model.parameters())
    hidden_ptr = storage_ptr(hidden)
    for path, t in tensors:
        assert storage_ptr(t) != hidden_ptr, f"{path} shares storage with the hidden masks"
        assert not matches_hidden(t, hidden, informative), f"{path} equals a hidden mask"


def test_walker_catches_a_leak(dataset) -> None:
    """The checks above can fail: a method that kept a hidden mask, or a view of the hidden
    tensor, or the split tensors themselves, is caught."""
    data, split = dataset
    cfg = load_config(None, [*TINY, "method.name=supervised"])
    trainer = build_trainer(cfg, data, split, CPU)
    hidden = as_tensor(trainer.tensors.hidden_unlabeled_masks)
    informative = torch.tensor([len(m.unique()) > 1 for m in hidden])
    i = int(informative.nonzero()[0])

    def found(stash) -> tuple[list[str], list[str]]:
        trainer.method.stash = stash
        tensors, forbidden = [], []
        walk(trainer.method, "m", set(), tensors, forbidden)
        del trainer.method.stash
        shared = [p for p, t in tensors if storage_ptr(t) == storage_ptr(hidden)]
        equal = [p for p, t in tensors if matches_hidden(t, hidden, informative)]
        return shared + equal, forbidden

    assert found(None) == ([], [])
    assert found({"x": [hidden[i].clone()]})[0]                  # a copy of one mask
    assert found((hidden[i].flatten().float().clone(),))[0]      # flattened, as floats
    assert found(hidden[3:5])[0]                                 # a view of the hidden tensor
    assert found(trainer.tensors)[1]                             # the engine's split tensors
    assert bool(found(trainer.tensors.test.images)[1]) == isinstance(data.images, np.memmap)  # gathered rows
    assert found(lambda: hidden)[0]                              # a closure over the masks
    tensors = trainer.tensors
    assert found(functools.partial(print, lambda: tensors))[1]   # ... over the split tensors
    assert found(torch.nn.functional.cross_entropy) == ([], [])  # a plain function is fine
