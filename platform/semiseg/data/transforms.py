"""Batched augmentations on tensors, on whatever device the batch lives on.

`weak_geometric` warps images and masks with one random affine per image; `strong_photometric`
changes intensities only, so a strong view stays pixel-aligned with its weak view and methods
can compare the two pixel by pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_affine(n: int, gen: torch.Generator, max_deg: float = 15.0,
                  scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.08) -> Tensor:
    """(n, 2, 3) affine matrices in normalised coordinates, drawn on the CPU for determinism."""
    u = torch.rand(n, 4, generator=gen)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * shift, (u[:, 3] * 2 - 1) * shift
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def apply_affine(theta: Tensor, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    theta = theta.to(image.device, image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    # Border padding: a black corner would be a new "structure" in a normalised image.
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mask is None:
        return out, None
    warped = F.grid_sample(mask[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return out, warped[:, 0].long()


def weak_geometric(image: Tensor, mask: Tensor | None, gen: torch.Generator,
                   extra: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Warp image, mask and an optional second mask (`extra`) with the same random affine."""
    theta = random_affine(image.shape[0], gen)
    image, mask = apply_affine(theta, image, mask)
    if extra is not None:
        _, extra = apply_affine(theta, image, extra)
    return image, mask, extra


def strong_photometric(image: Tensor, gen: torch.Generator) -> Tensor:
    """Contrast, brightness, gamma-like curve, blur and noise; geometry untouched."""
    n = image.shape[0]
    u = torch.rand(n, 5, generator=gen).to(image.device, image.dtype)[:, :, None, None]
    # Mild on purpose: intensity is what separates tissues here, and strong views share
    # BatchNorm statistics with clean ones (ranges like the medical mean-teacher literature's).
    contrast = 0.85 + 0.3 * u[:, 0:1]
    brightness = (u[:, 1:2] - 0.5) * 0.2
    curve = (u[:, 2:3] - 0.5) * 0.2  # bends intensities like a gamma change would
    out = image * contrast + brightness + curve * image.abs()
    blurred = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=False)
    blur = (u[:, 3:4] > 0.5).to(image.dtype)
    out = blur * blurred + (1 - blur) * out
    noise = torch.randn(image.shape, generator=gen).to(image.device, image.dtype)
    return out + noise * (0.05 + 0.1 * u[:, 4:5])
