"""CutMix between unlabeled images (Yun et al., ICCV 2019), as UniMatch uses it for segmentation
(Yang et al., CVPR 2023; LiheYoung/UniMatch, `more-scenarios/medical/dataset/transform.py`,
`obtain_cutmix_box`): one rectangle per image, where the image, its pseudo-label and its
confidence are all taken from the mix partner, so image and target stay aligned pixel for pixel.

Box sampling follows `obtain_cutmix_box`: applied with probability p per image; area a uniform
fraction in [0.02, 0.4] of the image; aspect ratio h / w uniform in [0.3, 1/0.3]; position uniform
over the positions where the box fits. Deviation: UniMatch redraws ratio and position until the
box fits; here the box side is capped at the image side and the position is drawn among those
that fit, so every call uses a fixed number of random draws (reproducible from the generator)
and boxes of extreme ratio come out slightly smaller instead of rarer.

Not a method (it registers nothing): shared by the methods that offer `cutmix`.
"""

from __future__ import annotations

import torch
from torch import Tensor

AREA = (0.02, 0.4)
ASPECT = (0.3, 1 / 0.3)


def cutmix_box(n: int, height: int, width: int, gen: torch.Generator, p: float = 0.5,
               device: torch.device | str | None = None) -> Tensor:
    """(n, height, width) bool: True inside the box pasted from the partner. An image that draws
    no CutMix (probability 1 - p) gets an all-False map. Random numbers come from `gen` on the
    CPU, so boxes do not depend on the device."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutmix_box: p={p}: expected a probability in [0, 1]")
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"cutmix_box: n={n}, height={height}, width={width}: expected n >= 0 "
                         "and a positive image size")
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    apply = u[:, 0] < p
    area = (AREA[0] + u[:, 1] * (AREA[1] - AREA[0])) * height * width
    ratio = ASPECT[0] + u[:, 2] * (ASPECT[1] - ASPECT[0])  # h / w, uniform as in UniMatch
    box_h = torch.sqrt(area * ratio).floor().clamp(1, height).long()
    box_w = torch.sqrt(area / ratio).floor().clamp(1, width).long()
    top = (u[:, 3] * (height - box_h + 1)).floor().long().clamp(max=height - box_h)
    left = (u[:, 4] * (width - box_w + 1)).floor().long().clamp(max=width - box_w)
    rows = torch.arange(height)[None, :]
    cols = torch.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
    return box.to(device) if device is not None else box


def mix(a: Tensor, b: Tensor, box: Tensor) -> Tensor:
    """`b` inside the box, `a` elsewhere. Works for images and soft targets (N, C, H, W) and for
    hard labels, confidences and masks (N, H, W), of any dtype; `box` is (N, H, W) bool."""
    if a.shape != b.shape:
        raise ValueError(f"mix: the two tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if box.dtype != torch.bool or box.dim() != 3:
        raise ValueError(f"mix: box must be a (N, H, W) bool tensor, got {box.dtype} {tuple(box.shape)}")
    if a.dim() not in (3, 4) or (a.shape[0], *a.shape[-2:]) != tuple(box.shape):
        raise ValueError(f"mix: tensor {tuple(a.shape)} does not fit box {tuple(box.shape)}; "
                         "expected (N, H, W) or (N, C, H, W) with the box's N, H and W")
    where = box[:, None] if a.dim() == 4 else box
    return torch.where(where.to(a.device), b, a)


def partner(x: Tensor) -> Tensor:
    """Each image's mix partner: the batch rolled by one (image i takes from image i - 1).
    UniMatch draws a second unlabeled batch instead; rolling costs no extra forward pass."""
    return x.roll(1, dims=0)


def step_generator(base: int, step: int) -> torch.Generator:
    """The generator for step `step`'s boxes: a function of (base, step) only, so a resumed run
    draws the same boxes without checkpointing generator state."""
    return torch.Generator().manual_seed((base * 1_000_003 + step) % (2 ** 63))
