"""Segmentation networks, looked up by name (the config's ``model.name``)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from semiseg.models.unet import UNet
from semiseg.registry import Registry

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")
MODELS.register("unet")(UNet)


def create_model(
    name: str, in_channels: int, num_classes: int, base_channels: int = 16, depth: int = 3
) -> nn.Module:
    """Build a registered model; unknown names raise RegistryError listing the choices."""
    builder = MODELS.get(name)
    return builder(
        in_channels=in_channels, num_classes=num_classes, base_channels=base_channels, depth=depth
    )


__all__ = ["MODELS", "UNet", "create_model"]
