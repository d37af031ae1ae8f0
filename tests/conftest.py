"""Fixtures shared by the unit tests.

`stage_inputs` lets registry-wide tests build any method, multi-stage ones included, without
knowing it: a method's last TrainStage may read earlier stages' outputs (`TrainStage.inputs`),
which the stage runner supplies in a trial; here each kind of stage output has one stand-in.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import pytest
import torch

from semiseg.config import Config, MethodConfig
from semiseg.methods import METHODS, PseudoLabelStage
from semiseg.sam.store import PseudoLabelStore

@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    CPU float reductions are then bitwise reproducible, and tests don't oversubscribe 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


StageInputs = Callable[[str, Iterable[int], tuple[int, int], int], dict[str, str]]


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory) -> StageInputs:
    """`stage_inputs(method, indices, (H, W), num_classes)`: the method params that its last
    stage reads from earlier stages, filled with stand-ins for the images at dataset `indices`
    (a PseudoLabelStage's output: a manifest of random labels, never a real mask). {} for a
    single-stage method."""
    made: dict[tuple, str] = {}

    def manifest(indices: tuple[int, ...], shape: tuple[int, int], num_classes: int) -> str:
        key = (indices, shape, num_classes)
        if key not in made:
            store = PseudoLabelStore(tmp_path_factory.mktemp("pseudolabels"),
                                     [f"c{i}" for i in range(num_classes)])
            rng = np.random.default_rng(len(made))
            for index in indices:
                store.write(index, f"img{index}", rng.integers(0, num_classes, shape), {1: 0.9})
            made[key] = str(store.write_manifest())
        return made[key]

    def inputs(method: str, indices: Iterable[int], shape: tuple[int, int],
               num_classes: int) -> dict[str, str]:
        stages = METHODS.get(method).stages(Config(method=MethodConfig(method)))
        kinds = {stage.name: type(stage) for stage in stages}
        params = {}
        for param, source in stages[-1].inputs.items():
            if kinds[source] is not PseudoLabelStage:
                pytest.fail(f"{method}: no stand-in for the output of a {kinds[source].__name__} "
                            f"(its param {param!r}); add one to tests/conftest.py")
            params[param] = manifest(tuple(indices), tuple(shape), num_classes)
        return params

    return inputs
