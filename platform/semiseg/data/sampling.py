"""Tensors on the training device and a seeded random batch sampler.

The datasets here fit in memory, so each split lives on the device as one tensor and a batch is
an index: no loader workers, nothing to starve the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from semiseg.data.base import SegData
from semiseg.data.splits import Split


@dataclass
class Subset:
    images: Tensor          # (n, C, H, W) float32
    masks: Tensor | None    # (n, H, W) int64, None where a method must not see them
    index: Tensor           # (n,) indices into the dataset

    def __len__(self) -> int:
        return len(self.index)


def subset(data: SegData, indices: list[int], device: torch.device, with_masks: bool) -> Subset:
    idx = np.asarray(indices, dtype=np.int64)
    images = torch.from_numpy(data.images[idx]).float()
    images = (images[:, None] if images.dim() == 3 else images).to(device)  # (n, C, H, W)
    masks = torch.from_numpy(data.masks[idx]).long().to(device) if with_masks else None
    return Subset(images, masks, torch.from_numpy(idx))


@dataclass
class SplitTensors:
    """The split as device tensors. `hidden_unlabeled_masks` is the platform's own copy of the
    unlabeled images' masks, used only to score pseudo-labels; methods never receive it."""

    labeled: Subset
    unlabeled: Subset
    val: Subset
    test: Subset
    hidden_unlabeled_masks: Tensor | None


def split_tensors(data: SegData, split: Split, device: torch.device) -> SplitTensors:
    hidden = subset(data, split.unlabeled, device, with_masks=True).masks if split.unlabeled else None
    return SplitTensors(
        labeled=subset(data, split.labeled, device, with_masks=True),
        unlabeled=subset(data, split.unlabeled, device, with_masks=False),
        val=subset(data, split.val, device, with_masks=True),
        test=subset(data, split.test, device, with_masks=True),
        hidden_unlabeled_masks=hidden,
    )


class RandomBatches:
    """Draws batches of positions into a Subset, with replacement, from its own generator
    (so a resumed run continues the same stream once the generator state is restored)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size = size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Tensor:
        return torch.randint(self.size, (self.batch_size,), generator=self.generator)
