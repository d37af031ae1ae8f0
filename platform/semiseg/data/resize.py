"""Resize an image/mask pair to a square size: bilinear for the image, nearest for the mask."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32, mask int64), both (size, size).

    The mask uses nearest-neighbour so labels stay labels (no blended class values).
    """
    if image.shape == (size, size) and mask.shape == (size, size):
        return image.astype(np.float32), mask.astype(np.int64)
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    return img[0, 0].numpy(), resize_labels(mask, (size, size))


def resize_labels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map resized to `size` (H, W) as int64 by the mask rule of resize_pair, so a mask
    made at source resolution (a SAM refinement) lands on the pixels the dataset's own mask
    does at image_size."""
    if mask.shape == tuple(size):
        return mask.astype(np.int64)
    # Nearest on float labels is exact for any integer range a mask can hold here.
    msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    msk = F.interpolate(msk, size=tuple(size), mode="nearest")
    return msk[0, 0].numpy().astype(np.int64)


def pad_square(a: np.ndarray, value: float) -> np.ndarray:
    """Pad a 2D array to a centred square, so a later square resize keeps its aspect ratio."""
    h, w = a.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    return np.pad(a, ((top, n - h - top), (left, n - w - left)), constant_values=value)
