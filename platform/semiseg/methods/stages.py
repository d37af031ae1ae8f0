"""A method's stages, as plain data: what one trial runs, in order (no Ray, no torch).

Most methods are one `TrainStage`. A multi-stage method (a coarse model, then pseudo-labels,
then a retrain) returns several from `Method.stages(cfg)`, the way nnU-Net declares a cascade:
each stage names its output, and a later stage reads an earlier one's output by that name.
`semiseg.distributed.stages` runs any such list; it never names a method.

- A `TrainStage`'s output is its final checkpoint (a folder holding checkpoint.pt).
- A `PseudoLabelStage`'s output is the manifest of the SAM-refined pseudo-labels it wrote.
- The last stage is a `TrainStage`: the trial's model. Only it reports to Tune and logs its
  epochs to the trial's MLflow run; earlier stages train quietly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from semiseg.errors import ConfigError


@dataclass
class TrainStage:
    """Train `method` with `params` on the trial's data (engine.fit in Ray Train)."""

    method: str
    """A registered method name."""
    params: dict[str, Any] = field(default_factory=dict)
    """The method's params, before `inputs` are filled in."""
    name: str = ""
    """Its output's name for later stages, and the suffix of its Ray Train run ("" = none)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Method param -> name of the earlier stage whose output it is set to, e.g.
    {"manifest": "pseudolabels-round0"}."""


@dataclass
class PseudoLabelStage:
    """Refine pseudo-labels for the trial's unlabeled split with SAM (the `sam` config section),
    prompted by the masks of the model an earlier TrainStage trained."""

    name: str
    """Its output's name, and its folder under the trial's storage."""
    model: str
    """Name of the earlier TrainStage whose checkpoint is the coarse model."""
    round: int = 0
    """The MLflow step of its pseudo-label quality metrics (sam/*) and its artifact folder
    pseudolabels/round{round}."""


Stage = Union[TrainStage, PseudoLabelStage]


def check_stages(stages: list[Stage], method: str) -> None:
    """Raise ConfigError unless `stages` can run: not empty, ending in a TrainStage, names
    unique, every input the output of an earlier stage of the right kind."""
    where = f"method {method!r} stages"
    if not stages:
        raise ConfigError(f"{where}: none; expected at least one TrainStage")
    if not isinstance(stages[-1], TrainStage):
        raise ConfigError(f"{where}: the last is {type(stages[-1]).__name__}; expected a TrainStage "
                          "(the trial's model)")
    kinds: dict[str, type] = {}
    for stage in stages:
        needs = stage.inputs.values() if isinstance(stage, TrainStage) else [stage.model]
        for ref in needs:
            if ref not in kinds:
                raise ConfigError(f"{where}: stage {stage.name!r} reads {ref!r}, which no earlier "
                                  f"stage outputs (earlier: {', '.join(kinds) or 'none'})")
        if isinstance(stage, PseudoLabelStage) and kinds[stage.model] is not TrainStage:
            raise ConfigError(f"{where}: stage {stage.name!r} needs a model from a TrainStage, "
                              f"not {stage.model!r}")
        if stage.name in kinds:
            raise ConfigError(f"{where}: two stages are named {stage.name!r}")
        kinds[stage.name] = type(stage)


def resolve_inputs(stage: TrainStage, outputs: dict[str, Any]) -> dict[str, Any]:
    """The stage's method params with its inputs set from earlier stages' outputs."""
    return {**stage.params, **{param: str(outputs[ref]) for param, ref in stage.inputs.items()}}
