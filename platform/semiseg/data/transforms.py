"""Batched augmentations on tensors, on whatever device the batch lives on.

`weak_geometric` warps images and masks with one random affine per image; `strong_photometric`
changes intensities only, so a strong view stays pixel-aligned with its weak view and methods
can compare the two pixel by pixel. Strength beyond that comes from CutMix, which methods apply
with their targets (`semiseg.methods.cutmix`).
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


# Strong-view magnitudes. UniMatch (LiheYoung/UniMatch, more-scenarios/medical/dataset/acdc.py)
# applies ColorJitter(0.5, 0.5, 0.5, 0.25) with p = 0.8 on [0, 1] images, Gaussian blur with
# sigma in [0.1, 2] with p = 0.5, and CutMix with p = 0.5 for strength. We keep its
# probabilities and its [0, 1] space but bound the magnitudes far more tightly, because tissue
# classes here are defined by intensity levels: on mni-tissue (64 px), in [0, 1] space, grey
# matter sits at 0.72 and white matter at 0.90 (each within about 0.02 over slices). At these
# bounds no level moves by more than 0.06 of the range, a third of that gap; the old view's
# contrast alone moved white matter by more than half of it (issue 11).
JITTER_P = 0.8
GAIN = (0.95, 1.05)        # multiplicative brightness / contrast about the background
GAMMA_MAX = 1.1            # gamma in [1/1.1, 1.1], log-uniform
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 1.0)    # pixels; UniMatch's 2.0 is for 256-pixel crops
BLUR_RADIUS = 2            # taps either side: covers 2 sigma at the largest sigma


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per image (`sigma`: (N,)), replicate padding so a
    constant border stays constant. Weights sum to 1, so a region of zeros stays exactly zero."""
    n, c, h, w = x.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (BLUR_RADIUS,) * 2 + (0, 0), mode="replicate"),
                    kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0) + (BLUR_RADIUS,) * 2, mode="replicate"),
                    kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def strong_photometric(image: Tensor, gen: torch.Generator, blur_p: float = BLUR_P) -> Tensor:
    """A label-safe strong view: gain and gamma in a per-image [0, 1] space, then blur; geometry
    untouched.

    Each image is min-max scaled to [0, 1], jittered there (with probability JITTER_P) by a
    gain (multiplicative brightness, which in one grey channel is also a contrast stretch about
    the background) and a gamma, blurred with probability `blur_p` (train.strong_blur_p,
    default BLUR_P; the draws are the same whatever it is), and mapped back with the same
    min and max. Gain and gamma fix 0 and are strictly increasing, so the darkest level (the
    constant background of MR, CT and most phantoms) stays exactly where it was, and the order
    of tissue intensities is kept; blur keeps a constant background exactly away from its edges
    (BLUR_RADIUS pixels). No additive brightness and no noise: they would move the background,
    which is what class 0 is. A constant image is returned unchanged."""
    n = image.shape[0]
    u = torch.rand(n, 5, generator=gen).to(image.device, image.dtype)  # same draws every call
    lo = image.amin(dim=(1, 2, 3), keepdim=True)
    span = image.amax(dim=(1, 2, 3), keepdim=True) - lo
    flat = span <= 0
    x = ((image - lo) / torch.where(flat, torch.ones_like(span), span)).clamp(0.0, 1.0)
    jitter = (u[:, 0] < JITTER_P)[:, None, None, None]
    gain = GAIN[0] + u[:, 1] * (GAIN[1] - GAIN[0])
    gamma = torch.exp((2 * u[:, 2] - 1) * math.log(GAMMA_MAX))
    jittered = gain[:, None, None, None] * x ** gamma[:, None, None, None]
    x = torch.where(jitter, jittered, x)
    blur = (u[:, 3] < blur_p)[:, None, None, None]
    sigma = BLUR_SIGMA[0] + u[:, 4] * (BLUR_SIGMA[1] - BLUR_SIGMA[0])
    x = torch.where(blur, gaussian_blur(x, sigma), x)
    return torch.where(flat, image, lo + x * span)
