"""Procedural chest-radiograph phantoms: a dataset that needs no files and no download.

Each phantom is a frontal (PA) chest X-ray-like projection: a body outline, two lungs (air,
dark), the heart, the spine with vertebral banding, plus unlabeled ribs, clavicles and a denser
abdomen as distractors. The image is a sum of attenuations (a projection), so structures
OVERLAP: the heart lies over the lower medial part of the left lung (image right) and over the
spine. The label map is resolved by a fixed priority, highest first:

    heart > spine > lung > background

Classes: 0 background (air and soft tissue, ribs, clavicles), 1 lung, 2 heart, 3 spine.

Difficulty comes from what real radiographs have: random anatomy (size, position, rotation,
harmonic outline perturbations and a smooth elastic warp of the whole scene), soft projected
edges (thickness profiles, so boundaries are low contrast), bone distractors as bright as the
spine, heart and abdomen of similar density, smooth texture inside structures, a bias field,
blur, random gamma / exposure window and strong additive noise.

Determinism: phantom i depends only on (BASE_SEED, i) and the image size; it is drawn at the
requested size (no fixed-size resize), with all random numbers that do not depend on the size
drawn first, so phantom i shows the same anatomy at 32, 64 or 128 pixels.

Native resolution (`data.native_size`, e.g. 256): phantoms are drawn at that size and
downsampled to image_size, like radiographs a user brings at 512 x 512 and trains on at 64;
the SAM stage refines the phantom at its native size (issue 13).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from semiseg.data_config import DataConfig
from semiseg.data.base import DATASETS, SegData
from semiseg.data.resize import resize_pair

CLASSES = ["background", "lung", "heart", "spine"]
# Painted in this order, so later entries win where structures overlap.
PAINT_ORDER = ("lung", "spine", "heart")
BASE_SEED = 1234


@dataclass
class Phantom:
    """One phantom: the (un-normalised) image, the resolved label map, and each labeled
    structure's full projected support before the priority resolution (they overlap)."""

    image: np.ndarray
    mask: np.ndarray
    supports: dict[str, np.ndarray]


def _smooth_fields(rng: np.random.Generator, n: int, cells: int, size: int) -> np.ndarray:
    """n smooth random fields (n, size, size), about unit std: a coarse grid, bicubic-upsampled.

    align_corners=True makes the field the same function of position at every resolution."""
    coarse = torch.from_numpy(rng.standard_normal((1, n, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0].numpy()


def _blob(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
    centre: tuple[float, float], axes: tuple[float, float], theta: float, egg: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A deformed ellipse: (support, projected thickness in [0, 1]).

    The outline radius is 1 + egg*sin(phi) (wider at the bottom) plus random harmonics 2..4;
    the thickness falls to 0 at the outline like a projected ellipsoid (soft, low-contrast edge).
    """
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = x - centre[0], y - centre[1]
    u, v = (c * dx + s * dy) / axes[0], (-s * dx + c * dy) / axes[1]
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    radius = 1.0 + egg * np.sin(phi)
    for k, amp, phase in zip((2, 3, 4), rng.uniform(0, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)):
        radius = radius + amp * np.cos(k * phi + phase)
    t = np.clip(1.0 - (rho / radius) ** 2, 0.0, None)
    return t > 0, np.sqrt(t)


def make_phantom(index: int, size: int) -> Phantom:
    """Draw phantom `index` at size x size pixels."""
    rng = np.random.default_rng([BASE_SEED, index])
    u = rng.uniform
    # --- scene pose and smooth fields (size-independent draws) ------------------------------
    angle, scale, shift = u(-0.15, 0.15), u(0.82, 1.12), u(-0.1, 0.1, 2)
    warp = _smooth_fields(rng, 3, 4, size)  # dx, dy, bias field
    tex = _smooth_fields(rng, 3, 9, size)  # body, lung, heart textures
    lin = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    ca, sa = np.cos(angle), np.sin(angle)
    x = (ca * xx + sa * yy) / scale - shift[0] + 0.08 * warp[0]
    y = (-sa * xx + ca * yy) / scale - shift[1] + 0.08 * warp[1]

    # --- anatomy --------------------------------------------------------------------------------
    bx = 0.9 * u(0.9, 1.08)
    body_t = np.clip(1 - (np.abs(x / bx) ** 4 + np.abs(y / 1.35) ** 4), 0, None) ** 0.5
    body = body_t > 0
    ay = 0.58 * u(0.85, 1.1)
    lungs = []
    for side, cx in ((-1, -0.41), (1, 0.40)):
        lungs.append(_blob(
            x, y, rng, (cx + rng.normal(0, 0.03), -0.04 + rng.normal(0, 0.03)),
            (0.26 * u(0.85, 1.15), ay * (0.95 if side > 0 else 1.0) * u(0.95, 1.05)),
            side * u(-0.05, 0.2), u(0.05, 0.2),
        ))
    lung = (lungs[0][0] | lungs[1][0]) & body
    lung_t = np.maximum(lungs[0][1], lungs[1][1]) * body
    heart, heart_t = _blob(
        x, y, rng, (0.1 + rng.normal(0, 0.04), 0.3 + rng.normal(0, 0.04)),
        (0.34 * u(0.85, 1.15), 0.25 * u(0.85, 1.15)), u(-0.5, -0.15), u(0.0, 0.15),
    )
    sc = x - (rng.normal(0, 0.02) + rng.normal(0, 0.03) * y + rng.normal(0, 0.04) * y**2)
    sw = 0.085 * u(0.85, 1.15) * (1 + 0.15 * y)
    spine_t = np.sqrt(np.clip(1 - (sc / sw) ** 2, 0, None))
    spine = spine_t > 0
    period, phase = 0.17 * u(0.85, 1.15), u(0, 1)
    vertebrae = 0.75 + 0.25 * np.cos(2 * np.pi * (y / period - phase))
    # Ribs: arcs running laterally downward on both sides; clavicles: bars near the top.
    n_ribs = 8
    y0 = (-0.62 + np.arange(n_ribs) * 0.15 * u(0.9, 1.1) + u(-0.04, 0.04, n_ribs))[:, None, None]
    ax_ = np.abs(x)[None]
    rib_y = y0 + 0.25 * ax_ + 0.35 * ax_**2
    ribs = (np.exp(-(((y[None] - rib_y) / 0.03) ** 2)) * (ax_ > 0.08)).sum(0)
    clav_y = -0.66 + u(-0.05, 0.05) - u(0.1, 0.3) * (np.abs(x) - 0.1)
    clav = np.exp(-(((y - clav_y) / 0.035) ** 2)) * (np.abs(x) > 0.07) * (np.abs(x) < 0.6)
    abdomen = np.clip((y - 0.45) / 0.3, 0, 1)

    # --- projection: a sum of attenuations (bright = dense), contrasts vary per image --------
    att = (
        0.5 * u(0.8, 1.2) * body_t * (1 + 0.1 * tex[0])
        + 0.2 * u(0.5, 1.5) * abdomen * body
        - 0.4 * u(0.45, 1.3) * lung_t * (1 + 0.35 * tex[1])
        + 0.25 * u(0.5, 1.3) * heart_t * (1 + 0.15 * tex[2])
        + 0.25 * u(0.6, 1.4) * spine_t * vertebrae * body
        + (0.08 * u(0.5, 2.0) * ribs + 0.18 * u(0.5, 1.5) * clav) * body
    )
    att = np.clip(att, 0, None) * (1 + 0.3 * warp[2]) + 0.03
    # A strong negative warp can push a few pixels below 0, and a fractional power of a
    # negative is NaN (phantom 295 was one); clipping leaves every other phantom as it was.
    att = np.clip(gaussian_filter(att, sigma=u(0.6, 1.6) * size / 64), 0, None)
    att = (att / att.max()) ** u(0.6, 1.6)  # gamma: film / detector response varies
    lo, hi = u(0.0, 0.1), u(0.85, 1.0)  # exposure window: some saturation at either end
    img = np.clip((att - lo) / (hi - lo), 0, 1)
    noise_sigma = u(0.05, 0.15)
    # Per-pixel noise last: its draw count depends on size, nothing after it may.
    img = img + noise_sigma * rng.standard_normal(img.shape)

    supports = {"lung": lung, "heart": heart & body, "spine": spine & body}
    mask = np.zeros((size, size), dtype=np.int64)
    for name in PAINT_ORDER:
        mask[supports[name]] = CLASSES.index(name)
    return Phantom(img.astype(np.float32), mask, supports)


def native_phantom(index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of phantom `index` drawn at size x size: `SegData.native` of a dataset
    made with data.native_size (a module function, so the dataset stays picklable)."""
    phantom = make_phantom(index, size)
    return phantom.image, phantom.mask


@DATASETS.register("synthetic")
def build(cfg: DataConfig) -> SegData:
    """cfg.num_images phantoms at cfg.image_size; each phantom is its own group ("patient").

    With data.native_size, each phantom is drawn at that size and brought to image_size by
    the rule every file dataset uses (`resize_pair`: bilinear image, nearest mask), so the
    training images are downsampled radiographs and `SegData.native` holds the originals."""
    size = getattr(cfg, "native_size", 0) or cfg.image_size
    pairs = [resize_pair(*native_phantom(i, size), cfg.image_size) for i in range(cfg.num_images)]
    ids = [f"phantom{i:05d}" for i in range(cfg.num_images)]
    return SegData(
        images=np.stack([image for image, _ in pairs]).astype(np.float32),  # raw: see load_dataset
        masks=np.stack([mask for _, mask in pairs]),
        groups=list(ids),
        ids=ids,
        classes=list(CLASSES),
        source="synthetic",
        native=functools.partial(native_phantom, size=size) if size != cfg.image_size else None,
    )
