"""SAM at each image's source resolution (issue 13).

Models train at `data.image_size` (64 x 64 by default), but SAM was trained on photographs
around 1024 pixels wide: fed a 64 x 64 noisy image upsampled 16-fold it follows the noise
(docs/RESULTS.md). Keuth et al. 2024 ran SAM on the radiographs at full resolution. So the SAM
stage reads each image at its source resolution (`SegData.native`: the PNG's size, a volume's
slice size, a phantom's `data.native_size`), upsamples the coarse mask to it, refines there,
and brings the refined mask back to the training size by the rule the dataset made its own
masks with (`semiseg.data.resize.resize_labels`), so it lands on the training mask's pixels.

- Up: centred nearest-neighbour (`nearest-exact`). The training image is a centred bilinear
  resampling of the native one, so this puts each coarse pixel over the native pixels it
  stands for; prompts (boxes, interior points) come from it.
- Small components are cleared at training size, before the upsampling, so
  `sam.min_component_size` counts training pixels at every native size.
- Down: the dataset's mask rule. A refined mask that equals the native truth comes back as
  exactly the training truth (tests/sam/test_native_resolution.py).

Deviation: the paper (multimodallearning/SamCarriesTheBurden) predicts its coarse masks at SAM's
resolution; here the coarse U-Net runs at the training size, as it was trained, and only its
label map is upsampled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from semiseg.data.base import SegData, normalise
from semiseg.data.resize import resize_labels
from semiseg.errors import DatasetError


def native_pair(data: SegData, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` and its mask at source resolution, the image normalised as the training
    images were (the dataset's statistics, or per image); the stored pair where the dataset has
    no other resolution. Refuses a pair that no longer matches the training mask (a file
    changed after the dataset was loaded), which would misplace every refined pixel."""
    if data.native is None:
        return data.images[index], data.masks[index]
    image, mask = data.native(index)
    if image.shape != mask.shape or image.ndim != 2:
        raise DatasetError(f"{data.source}: image {data.ids[index]} at source resolution is "
                           f"{image.shape} with a mask of {mask.shape}; expected one 2D shape")
    if not np.array_equal(resize_labels(mask, data.masks.shape[-2:]), data.masks[index]):
        raise DatasetError(f"{data.source}: image {data.ids[index]} at source resolution "
                           f"{image.shape[1]}x{image.shape[0]} does not match its training mask; "
                           "was its file changed after the dataset was loaded? Rerun to reload it")
    return _normalised(data, image), mask


def _normalised(data: SegData, image: np.ndarray) -> np.ndarray:
    if data.intensity is None:
        return normalise(image)
    from semiseg.data.normalize import apply_stats  # imports splits, which imports data.base

    return apply_stats(image[None], data.intensity)[0]


def drop_small_components(labels: np.ndarray, num_classes: int, min_size: int) -> np.ndarray:
    """`labels` with every connected component (scipy's default 4-connectivity, as the prompts
    use) under `min_size` pixels set to background."""
    out = labels.copy()
    for c in range(1, num_classes):
        components, count = ndimage.label(labels == c)
        if count:
            sizes = np.bincount(components.ravel())
            small = np.flatnonzero(sizes < min_size)
            out[np.isin(components, small[small > 0])] = 0
    return out


def to_native(coarse: np.ndarray, shape: tuple[int, int], num_classes: int, min_size: int) -> np.ndarray:
    """The coarse label map (training size) to prompt SAM with at `shape`: components under
    `min_size` training pixels cleared, then a centred nearest-neighbour upsampling."""
    kept = drop_small_components(coarse, num_classes, min_size)
    if kept.shape == tuple(shape):
        return kept.astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(kept, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest-exact")[0, 0].numpy().astype(np.uint8)


def to_training(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A refined label map at source resolution brought to the training `shape`, by the rule
    the dataset resized its masks with."""
    return resize_labels(labels, tuple(shape)).astype(np.uint8)
