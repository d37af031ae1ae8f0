"""Segmentation networks, looked up by name (the config's ``model.name``)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from semiseg.models.unet import UNet
from semiseg.registry import Registry

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")
MODELS.register("unet")(UNet)


def create_model(
    name: str, in_channels: int, num_classes: int, base_channels: int = 16, depth: int = 3,
    **options: Any,
) -> nn.Module:
    """Build a registered model; unknown names raise RegistryError listing the choices.
    `options` are the builder's further keywords that a method asks for (`Method.model_options`,
    e.g. UNet's ``seg_convs``); none by default."""
    builder = MODELS.get(name)
    return builder(
        in_channels=in_channels, num_classes=num_classes, base_channels=base_channels, depth=depth,
        **options,
    )


def model_options(weights: Mapping[str, Any]) -> dict[str, Any]:
    """The `create_model` options that a saved state dict was built with, read off its keys, so
    a checkpoint loads whichever method asked for them: UNet's ``seg_convs`` puts the classifier
    at ``head.1`` (a plain head is ``head.weight``)."""
    return {"seg_convs": True} if "head.1.weight" in weights else {}


__all__ = ["MODELS", "UNet", "create_model", "model_options"]
