"""Tensors on the training device and a seeded random batch sampler.

The datasets here fit in memory, so each split lives on the device as one tensor and a batch is
an index: no loader workers, nothing to starve the GPU. On the CPU, a split of a dataset that
the prepared-dataset cache maps (semiseg.data.cache) is not copied: its rows are gathered from
the mapped file at each access (`GatheredRows`), so the Train workers of a node share the page
cache's one copy instead of holding one each (P7 in docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from semiseg.data.base import SegData
from semiseg.data.splits import Split


class GatheredRows:
    """Rows `index` of a memory-mapped array, read as a CPU tensor: `rows[key]` (a position, a
    slice, an index tensor, optionally with trailing indices) gathers just those rows and
    copies only them; `len`, `shape`, `device` and `cpu()` (every row) behave as on a tensor.
    channel: add a channel axis to (H, W) rows, as `subset` does to a copied split."""

    device = torch.device("cpu")

    def __init__(self, source: np.ndarray, index: np.ndarray, dtype: torch.dtype, channel: bool) -> None:
        self.source, self.index, self.dtype, self.channel = source, index, dtype, channel

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> torch.Size:
        row = self.source.shape[1:]
        return torch.Size((len(self.index), *((1,) if self.channel else ()), *row))

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, Tensor):
            rows = rows.cpu().numpy()
        positions = self.index[rows]
        out = torch.from_numpy(np.array(self.source[positions])).to(self.dtype)  # these rows only
        out = out.unsqueeze(-3) if self.channel else out
        if not rest:
            return out
        return out[rest] if np.ndim(positions) == 0 else out[(slice(None), *rest)]

    def cpu(self) -> Tensor:
        return self[:]


Rows = Tensor | GatheredRows


@dataclass
class Subset:
    images: Rows            # (n, C, H, W) float32
    masks: Rows | None      # (n, H, W) int64, None where a method must not see them
    index: Tensor           # (n,) indices into the dataset

    def __len__(self) -> int:
        return len(self.index)


def subset(data: SegData, indices: list[int], device: torch.device, with_masks: bool) -> Subset:
    idx = np.asarray(indices, dtype=np.int64)
    if device.type == "cpu" and isinstance(data.images, np.memmap) and isinstance(data.masks, np.memmap):
        masks = GatheredRows(data.masks, idx, torch.long, channel=False) if with_masks else None
        return Subset(GatheredRows(data.images, idx, torch.float32, data.images.ndim == 3), masks,
                      torch.from_numpy(idx))
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
    hidden_unlabeled_masks: Rows | None


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
