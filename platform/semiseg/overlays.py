"""Prediction overlays as PNG: image | ground truth | prediction, one file per test image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def colorize(mask: np.ndarray) -> np.ndarray:
    """An RGBA layer: transparent background, one fixed colour per class."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    rgba = np.zeros((*mask.shape, 4))
    for label in np.unique(mask):
        if label == 0:
            continue
        rgba[mask == label] = (*cmap(int(label - 1) % 10)[:3], 0.45)
    return rgba


def write_overlays(examples: list[dict[str, Any]], out_dir: Path) -> int:
    """Write one PNG per example ({id, image, mask, pred}); returns how many were written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for ex in examples:
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
        for ax, title, layer in zip(axes, ("image", "ground truth", "prediction"),
                                    (None, ex["mask"], ex["pred"])):
            ax.imshow(ex["image"], cmap="gray")
            if layer is not None:
                ax.imshow(colorize(layer))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(ex["id"], fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{ex['id']}.png", dpi=80)
        plt.close(fig)
    return len(examples)
