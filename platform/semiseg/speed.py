"""Training speed options (train.channels_last, train.compile, train.cuda_graphs), as plain
functions the engine and the trainer call. Each is off by default until docs/BENCHMARKS.md (P6)
shows it pays on a GPU.

- channels_last: the model's 4-D weights and every batch in NHWC layout.
- compile: `nn.Module.compile` of the model and of every other network the method holds
  (teacher, matcher, labeller), *in place*: no `_orig_mod` wrapper, so `state_dict` keys, and
  therefore checkpoints, are the same as eager's. The method's `training_step` is compiled too
  where it works: its first STEP_WARMUP calls may compile; if the last of them still needed a
  new graph, the step recompiles at every call and the trainer runs the method's own step from
  then on (its networks stay compiled). That is the case for mean_teacher, low_confidence and
  reference_guided, whose Python-side ramp-up weight (`sigmoid_rampup(step)`) is a new constant
  at every step of the ramp. supervised, sam_refined, local_contrastive, pseudo_label and
  unimatch keep a compiled step (measured on CPU with aot_eager); past the warm-up, a call
  whose guards fail runs eagerly (the `eager_on_recompile` stance) instead of recompiling.
  Compiled code is not bitwise equal to eager: inductor fuses kernels (other rounding) and
  draws its own random numbers.
- cuda_graphs: compile with inductor's mode="reduce-overhead", which records CUDA graphs of
  the compiled forward and backward (CUDA graph trees); the trainer marks each step's start so
  that a step's outputs may be overwritten by the next replay. CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from semiseg.errors import ConfigError

STEP_WARMUP = 3
"""Calls of a compiled training step that may (re)compile: the first traces it, the second
makes the changing step number (and logged floats) dynamic, the third shows whether it is
stable (no new graph) or recompiles at every call."""


@dataclass(frozen=True)
class SpeedSettings:
    """The speed options as plain values (semiseg.engine.build_trainer takes them from train.*)."""

    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    cuda_graphs: bool = False

    @property
    def compiles(self) -> bool:
        return self.compile or self.cuda_graphs

    @property
    def mode(self) -> str | None:
        return "reduce-overhead" if self.cuda_graphs else None


def check_speed(speed: SpeedSettings, device: torch.device) -> None:
    """Raise ConfigError naming the train.* key when the options cannot run on `device`."""
    if speed.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs=true but the training device is {device.type}: CUDA "
                          "graphs need a CUDA device; set train.cuda_graphs=false")
    if speed.compiles:
        import torch._dynamo  # only when compiling: it takes a while to import

        known = torch._dynamo.list_backends(exclude_tags=())
        if speed.compile_backend not in known:
            raise ConfigError(f"train.compile_backend={speed.compile_backend!r}: expected one of "
                              f"{', '.join(sorted(known))}")


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model with its 4-D weights in NHWC layout (in place; parameters keep their identity,
    so an optimizer built before still holds them)."""
    return model.to(memory_format=torch.channels_last)


def batch_layout(speed: SpeedSettings) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the trainer lays out each image batch it feeds a network."""
    if speed.channels_last:
        return lambda images: images.contiguous(memory_format=torch.channels_last)
    return lambda images: images


def networks(model: nn.Module, method: Any) -> list[nn.Module]:
    """The trained model (inside any DDP wrapper) and every other network the method holds as
    an attribute (e.g. an EMA teacher), each once."""
    from semiseg.methods.common import unwrap  # here: semiseg.methods imports every method

    found: list[nn.Module] = [unwrap(model)]
    for value in vars(method).values():
        if isinstance(value, nn.Module) and all(unwrap(value) is not m for m in found):
            found.append(unwrap(value))
    return found


def compile_networks(model: nn.Module, method: Any, speed: SpeedSettings) -> None:
    """Compile every network of the run in place (`nn.Module.compile`): their state_dict keys,
    and so checkpoints, stay eager's. Copies made later (copy.deepcopy) would share the
    compiled call of the original, so methods copy their teachers at construction, before."""
    for net in networks(model, method):
        net.compile(backend=speed.compile_backend, mode=speed.mode)


class CompiledStep:
    """`training_step` under torch.compile where that works (see the module docstring):
    `compiled` turns False when the step still recompiled on its last warm-up call."""

    def __init__(self, step: Callable[..., Any], speed: SpeedSettings) -> None:
        self._eager = step
        self._compiled = torch.compile(step, backend=speed.compile_backend, mode=speed.mode)
        self.calls = 0
        self.compiled = True

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if not self.compiled:
            return self._eager(*args)
        if self.calls > STEP_WARMUP:
            with torch.compiler.set_stance("eager_on_recompile"):
                return self._compiled(*args)
        graphs = _graphs_compiled()
        out = self._compiled(*args)
        if self.calls == STEP_WARMUP and _graphs_compiled() > graphs:
            self.compiled = False
        return out


def _graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
