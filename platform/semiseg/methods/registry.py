"""The method registry. Each method lives in its own file and registers under that file's name.

`check_method` is the full check of one method setting (params in range, stages runnable) that
config loading applies to the config's method and to every combination of the sweep grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from semiseg.config_schema import build
from semiseg.errors import ConfigError
from semiseg.methods.stages import TrainStage, check_stages
from semiseg.registry import Registry

METHODS: Registry = Registry("method")

FULL_SUPERVISION_METHOD = "supervised"
"""The method trained on labels alone: the sweep's full-supervision upper bound
(sweep.full_supervision) and the coarse model of pseudo-label chains."""


def register_method(module_name: str) -> Callable[[type], type]:
    """Class decorator: `@register_method(__name__)` registers under the module's file name."""
    short = module_name.rsplit(".", 1)[-1]

    def add(cls: type) -> type:
        cls.name = short
        return METHODS.register(short)(cls)

    return add


def method_config(name: str, params: dict[str, Any]) -> Any:
    """The method's typed Config built from `params` (unknown keys and bad types raise)."""
    cls = METHODS.get(name)
    return build(cls.Config, params, prefix=f"method.params.", source=f"method {name!r}")


def check_method_params(name: str, params: dict[str, Any], check_values: bool = True) -> None:
    """Raise ConfigError naming the key if `params` does not fit the method's Config."""
    cls = METHODS.get(name)
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    for key in params:
        if key not in valid:
            raise ConfigError(
                f"method {name!r} has no parameter {key!r}; valid: {', '.join(valid) or '(none)'}"
            )
    if check_values:
        method_config(name, params)


def check_method(cfg: Any) -> None:
    """Raise ConfigError naming the key unless the method of `cfg` (a whole Config) can run:
    its params fit its Config (types and ranges), and so do those of every stage it declares."""
    name = cfg.method.name
    check_method_params(name, cfg.method.params)
    stages = METHODS.get(name).stages(cfg)
    check_stages(stages, name)
    for stage in stages:
        if isinstance(stage, TrainStage):
            check_method_params(stage.method, stage.params)
            check_method_params(stage.method, dict.fromkeys(stage.inputs), check_values=False)
