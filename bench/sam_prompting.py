"""Pseudo-label Dice of a coarse U-Net before and after SAM, for each prompting variant
(components largest/all x one or two stages), on the same unlabeled images, side by side.

    python bench/sam_prompting.py experiments/results_synthetic.yaml --checkpoint ray_results/<trial>-coarse
    python bench/sam_prompting.py experiments/results_mni.yaml --checkpoint <dir> --images 48 --seed 1

The checkpoint is any U-Net checkpoint trained on that config's labeled split (a sam_refined
trial leaves its coarse model under `<ray.storage_path>/<trial>-coarse/`). Prints a Markdown table
of Dice per foreground class against the hidden masks: the coarse masks, then each variant.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.sam.coarse import load_coarse_model, predict_labels
from semiseg.sam.models import build_sam
from semiseg.sam.refiner import SamRefiner, to_uint8_rgb
from semiseg.sam.store import image_dice

VARIANTS = [("largest", False), ("all", False), ("largest", True), ("all", True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=32, help="first N unlabeled images of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=20)
    p.add_argument("--figure", default="", help="also save a PNG: image, truth, coarse, SAM (the config's variant)")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config, [f"train.seed={args.seed}"])
    data = load_dataset(cfg.data)
    index = make_split(data, cfg.data, cfg.train.seed).unlabeled[:args.images]
    coarse = predict_labels(load_coarse_model(args.checkpoint, cfg.model, data.num_classes), data.images[index])
    rgb, truth = [to_uint8_rgb(im) for im in data.images[index]], data.masks[index]
    sam = build_sam(cfg.sam.model_type, cfg.sam.checkpoint)

    def row(name: str, maps: list[np.ndarray], seconds: float | None = None) -> str:
        per_class = np.nanmean([image_dice(m, t, data.num_classes) for m, t in zip(maps, truth)], 0)
        time_text = f"{seconds:.0f}" if seconds is not None else "-"
        return (f"| {name} | {np.nanmean(per_class):.3f} | " + " | ".join(f"{v:.3f}" for v in per_class)
                + f" | {time_text} |")

    print(f"`python {' '.join(sys.argv)}`: {len(index)} unlabeled images of {cfg.data.name}, "
          f"SAM {cfg.sam.model_type}\n")
    print("| pseudo-labels | Dice mean | " + " | ".join(data.classes[1:]) + " | s |")
    print("|---|---|" + "---|" * (data.num_classes - 1) + "---|")
    print(row("coarse U-Net", list(coarse)))
    refined = {}
    for policy, two_stage in VARIANTS:
        start = time.perf_counter()
        out = SamRefiner(sam, two_stage=two_stage).refine(rgb, list(coarse), data.num_classes, policy, args.min_size)
        refined[policy, two_stage] = [o.labels for o in out]
        name = f"SAM, {policy} component(s), {'box then points + mask' if two_stage else 'box only'}"
        print(row(name, refined[policy, two_stage], time.perf_counter() - start), flush=True)
    if args.figure:
        save_figure(args.figure, rgb, truth, coarse, refined[cfg.sam.components, cfg.sam.two_stage])


def save_figure(path: str, rgb: list, truth: np.ndarray, coarse: np.ndarray, refined: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(4, len(rgb))
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2 * rows), squeeze=False)
    for r in range(rows):
        panels = [(rgb[r], "image"), (truth[r], "truth (hidden)"), (coarse[r], "coarse U-Net"), (refined[r], "SAM-refined")]
        for ax, (img, title) in zip(axes[r], panels):
            ax.imshow(img, cmap=None if img.ndim == 3 else "tab10", vmin=0, vmax=9 if img.ndim == 2 else None,
                      interpolation="nearest")
            ax.set_title(title if r == 0 else "", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
