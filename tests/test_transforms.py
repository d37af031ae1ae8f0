"""Augmentations: weak_geometric warps image, mask and `extra` identically; strong_photometric
changes intensities but not geometry, never moves a constant background, keeps the order of
tissue intensities and bounds how far any level moves; both are reproducible from their
generator."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from semiseg.data.synthetic import make_phantom
from semiseg.data.base import normalise
from semiseg.data.transforms import BLUR_RADIUS, random_affine, strong_photometric, weak_geometric


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def binary_shapes(n: int = 16, size: int = 48) -> torch.Tensor:
    """(n, 1, size, size) 0/1 images: an off-centre ellipse plus a rectangle, away from the
    border (so border padding of the image and zero padding of the mask agree)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        ry, rx = rng.uniform(0.1, 0.2, 2) * size
        shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        top, left = rng.integers(size // 6, size // 3, 2)
        shape[top:top + size // 8, left:left + size // 5] = True
        out[i, 0] = shape
    return torch.from_numpy(out)


def phantoms(n: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ps = [make_phantom(i, size) for i in range(n)]
    images = np.stack([(p.image - p.image.mean()) / p.image.std() for p in ps])[:, None]
    masks = np.stack([p.mask for p in ps])
    return torch.from_numpy(images).float(), torch.from_numpy(masks).long()


# ---- weak_geometric ------------------------------------------------------------------------


def test_weak_geometric_keeps_image_mask_extra_aligned() -> None:
    image = binary_shapes()
    mask = (image[:, 0] > 0).long()
    out_image, out_mask, out_extra = weak_geometric(image, mask, gen(0), extra=mask.clone())
    assert out_image.shape == image.shape and out_image.dtype == image.dtype
    assert out_mask.shape == mask.shape and out_mask.dtype == torch.long
    # the transform did something
    assert not torch.equal(out_mask, mask)
    warped = out_image[:, 0] > 0.5
    agree = (warped.long() == out_mask).float().mean(dim=(1, 2))
    assert agree.min() >= 0.98, agree
    # pixel agreement is dominated by background; IoU of the shapes is the sharper check
    # (an unwarped mask against the warped image scores about 0.5-0.7 here)
    fg = out_mask.bool()
    iou = (warped & fg).sum(dim=(1, 2)).float() / (warped | fg).sum(dim=(1, 2)).float()
    assert iou.min() >= 0.9, iou
    # extra goes through the same warp as mask
    assert torch.equal(out_extra, out_mask)


def test_weak_geometric_mask_none_extra_matches_mask_path() -> None:
    """The engine's unlabeled path: mask=None, hidden masks passed as `extra`."""
    image = binary_shapes(8)
    mask = (image[:, 0] > 0).long()
    _, warped_mask, _ = weak_geometric(image, mask, gen(3))
    out_image, out_mask, out_extra = weak_geometric(image, None, gen(3), extra=mask)
    assert out_mask is None
    assert torch.equal(out_extra, warped_mask)
    image_only, none_mask, none_extra = weak_geometric(image, None, gen(3))
    assert none_mask is None and none_extra is None
    assert torch.equal(image_only, out_image)


def test_weak_geometric_label_values_preserved() -> None:
    image, mask = phantoms()
    _, out_mask, _ = weak_geometric(image, mask, gen(1))
    # nearest-neighbour warp: no interpolated labels, only existing ones (0 outside)
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())
    # the warp is small (<= 15 deg, 10 % scale, 8 % shift): most labels stay put
    assert (out_mask == mask).float().mean() > 0.6


def test_weak_geometric_same_seed_same_output() -> None:
    image, mask = phantoms()
    a = weak_geometric(image, mask, gen(7), extra=mask)
    b = weak_geometric(image, mask, gen(7), extra=mask)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = weak_geometric(image, mask, gen(8), extra=mask)
    assert not torch.equal(a[0], c[0])


def test_weak_geometric_per_image_affines_differ() -> None:
    image, mask = phantoms(2)
    same = torch.cat([image[:1], image[:1]])
    out, _, _ = weak_geometric(same, None, gen(0))
    assert not torch.allclose(out[0], out[1])


def test_random_affine_bounds() -> None:
    theta = random_affine(256, gen(0))
    assert theta.shape == (256, 2, 3)
    linear = theta[:, :, :2]
    # rotation / scale: det = 1 / s^2 with s in [0.9, 1.1]
    det = torch.linalg.det(linear)
    assert det.min() >= 1 / 1.1 ** 2 - 1e-5 and det.max() <= 1 / 0.9 ** 2 + 1e-5
    assert theta[:, :, 2].abs().max() <= 0.08 + 1e-6


# ---- strong_photometric --------------------------------------------------------------------


def test_strong_photometric_shape_and_change() -> None:
    image, _ = phantoms()
    out = strong_photometric(image, gen(0))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, image)


def test_strong_photometric_keeps_geometry() -> None:
    image, _ = phantoms(16)
    out = strong_photometric(image, gen(0))
    for i in range(len(image)):
        corr = np.corrcoef(image[i].flatten().numpy(), out[i].flatten().numpy())[0, 1]
        assert corr > 0.5, (i, corr)


def test_strong_photometric_bright_pixel_stays() -> None:
    n, size = 32, 24
    image = torch.zeros(n, 1, size, size)
    rng = np.random.default_rng(0)
    where = rng.integers(2, size - 2, (n, 2))
    for i, (y, x) in enumerate(where):
        image[i, 0, y, x] = 100.0
    out = strong_photometric(image, gen(0))
    for i, (y, x) in enumerate(where):
        flat = int(out[i, 0].argmax())
        py, px = divmod(flat, size)
        assert abs(py - y) <= 1 and abs(px - x) <= 1, (i, (y, x), (py, px))


def test_strong_photometric_same_seed_same_output() -> None:
    image, _ = phantoms()
    assert torch.equal(strong_photometric(image, gen(5)), strong_photometric(image, gen(5)))
    assert not torch.equal(strong_photometric(image, gen(5)), strong_photometric(image, gen(6)))


def test_blur_p_zero_never_blurs_and_keeps_the_other_draws() -> None:
    """blur_p=0 (train.strong_blur_p, the ablation) is the same view minus blur: one pixel of
    tissue stays one pixel, and blur_p=1 blurs every image (its energy spreads)."""
    image = torch.zeros(16, 1, 12, 12)
    image[:, 0, 6, 6] = 1.0
    sharp = strong_photometric(image, gen(0), blur_p=0.0)
    assert (sharp[:, 0] != 0).sum(dim=(1, 2)).eq(1).all()
    blurred = strong_photometric(image, gen(0), blur_p=1.0)
    assert (blurred[:, 0] > 0).sum(dim=(1, 2)).gt(1).all()
    default = strong_photometric(image, gen(0))
    # Images the default leaves sharp are exactly the blur-off view: same gain and gamma draws.
    kept = (default[:, 0] != 0).sum(dim=(1, 2)).eq(1)
    assert 0 < kept.sum() < len(image)
    assert torch.equal(default[kept], sharp[kept])


def two_tissue_images(n: int = 64, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image z-scored images (as SegData holds them) of a constant black background with two
    rectangles of tissue, raw levels 0.6 (label 1, left half) and 0.9 (label 2, right half),
    at random places and sizes."""
    rng = np.random.default_rng(0)
    images, labels = np.zeros((n, size, size), np.float32), np.zeros((n, size, size), np.int64)
    for i in range(n):
        for label, x0 in ((1, 1), (2, size // 2 + 1)):
            top, left = rng.integers(1, size - 11), x0 + rng.integers(0, size // 2 - 12)
            labels[i, top:top + rng.integers(6, 11), left:left + rng.integers(6, 11)] = label
        raw = np.choose(labels[i], [0.0, 0.6, 0.9]).astype(np.float32)
        images[i] = normalise(raw)
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


def interior(labels: torch.Tensor, label: int) -> torch.Tensor:
    """Pixels of `label` whose whole blur neighbourhood has that label too."""
    k = 2 * BLUR_RADIUS + 1
    other = (labels != label).float()[:, None]
    return (F.max_pool2d(other, k, stride=1, padding=BLUR_RADIUS)[:, 0] == 0)


def test_strong_view_never_moves_a_constant_background() -> None:
    images, labels = two_tissue_images()
    background = interior(labels, 0)
    assert background.float().mean() > 0.3
    assert torch.equal(images[:, 0][labels == 0], images.amin(dim=(1, 2, 3))[:, None, None]
                       .expand_as(labels)[labels == 0])  # the background is each image's minimum
    for seed in range(3):
        out = strong_photometric(images, gen(seed))
        assert torch.equal(out[:, 0][background], images[:, 0][background])
        assert not torch.allclose(out, images)  # the tissue did change


def test_strong_view_keeps_the_order_of_tissue_levels() -> None:
    images, labels = two_tissue_images()
    background, low, high = interior(labels, 0), interior(labels, 1), interior(labels, 2)
    assert low.flatten(1).any(1).all() and high.flatten(1).any(1).all()
    for seed in range(3):
        out = strong_photometric(images, gen(seed))[:, 0]
        for i in range(len(out)):
            assert out[i][background[i]].max() < out[i][low[i]].min(), i
            assert out[i][low[i]].max() < out[i][high[i]].min(), i


def test_strong_view_moves_no_level_by_more_than_six_percent_of_the_range() -> None:
    images, labels = two_tissue_images()
    span = (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3)))[:, None, None]
    flat = interior(labels, 1) | interior(labels, 2)  # where blur has nothing to mix
    moved = []
    for seed in range(4):
        change = (strong_photometric(images, gen(seed)) - images)[:, 0].abs() / span
        assert change[flat].max() <= 0.06 + 1e-5
        moved.append(change[flat].max())
    assert max(moved) > 0.02  # the jitter is not a no-op


def test_strong_view_of_a_constant_image_is_that_image() -> None:
    image = torch.zeros(3, 1, 8, 8)  # normalise() turns a constant image into zeros
    image[1] = 2.5
    assert torch.equal(strong_photometric(image, gen(0)), image)
