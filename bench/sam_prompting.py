"""Pseudo-label Dice of a coarse U-Net before and after SAM, for each SAM model and prompting
variant (components largest/all x one or two stages), on the same unlabeled images, side by side.

    python bench/sam_prompting.py experiments/results_synthetic.yaml --checkpoint ray_results/<trial>-coarse
    python bench/sam_prompting.py experiments/results_synthetic.yaml --checkpoint <dir> --models vit_t litemedsam
    python bench/sam_prompting.py experiments/results_mni.yaml --checkpoint <dir> --images 48 --seed 1
    python bench/sam_prompting.py experiments/results_synthetic.yaml data.native_size=256 --checkpoint <dir>

The checkpoint is any U-Net checkpoint trained on that config's labeled split (a sam_refined
trial leaves its coarse model under `<ray.storage_path>/<trial>-coarse/`). `--models` defaults to
the config's `sam.model_type`; the config's `sam.checkpoint` applies to that model only, the
others use their official weights. As the pipeline does (semiseg.sam.native), with
`sam.native_resolution` (the default) SAM sees each image at its source resolution (a phantom's
`data.native_size`, a PNG's or slice's size), prompted from the coarse mask upsampled to it, and
its masks come back to the training size, where Dice is scored. Box-only models (LiteMedSAM, MedSAM) get the box-only
variants only. Each model's image encoder runs once per image; the variants share its
embeddings. Prints a Markdown table of Dice per foreground class against the hidden masks: the
coarse masks, then each model and variant, and the decoder seconds of each variant.
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
from semiseg.sam.models import build_sam, spec_of
from semiseg.sam.native import native_pair, to_native, to_training
from semiseg.sam.refiner import SamRefiner, to_uint8_rgb
from semiseg.sam.store import image_dice

VARIANTS = [("largest", False), ("all", False), ("largest", True), ("all", True)]
NAMES = {"vit_t": "MobileSAM", "litemedsam": "LiteMedSAM", "medsam_vit_b": "MedSAM ViT-B"}


def variants_for(sam: torch.nn.Module) -> list[tuple[str, bool]]:
    """Every variant, or only the box-only ones for a model trained on boxes alone."""
    return [v for v in VARIANTS if not (v[1] and spec_of(sam).box_only)]


def refine_variants(sam: torch.nn.Module, rgb: list[np.ndarray], coarse: list[np.ndarray], num_classes: int,
                    train_shape: tuple[int, int]) -> tuple[float, dict[tuple[str, bool], tuple[list[np.ndarray], float]]]:
    """Encoder seconds, and per variant the refined label maps (at the training size) and the
    decoder seconds. `coarse` is already at each image's size, its small components cleared."""
    refiner = SamRefiner(sam, two_stage=False)
    start = time.perf_counter()
    embeddings, sizes = refiner.embed(rgb)
    encode_s = time.perf_counter() - start
    originals = [tuple(im.shape[:2]) for im in rgb]
    out = {}
    for policy, two_stage in variants_for(sam):
        refiner.two_stage = two_stage
        start = time.perf_counter()
        refined = refiner.refine_embedded(embeddings, sizes, originals, coarse, num_classes, policy, 1)
        out[policy, two_stage] = ([to_training(r.labels, train_shape) for r in refined], time.perf_counter() - start)
    return encode_s, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (e.g. data.native_size=256)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=32, help="first N unlabeled images of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=20)
    p.add_argument("--models", nargs="+", default=None, help="sam.model_type values (default: the config's)")
    p.add_argument("--figure", default="", help="also save a PNG: image, truth, coarse, SAM (the config's variant)")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config, [*args.overrides, f"train.seed={args.seed}"])
    models = args.models or [cfg.sam.model_type]
    data = load_dataset(cfg.data)
    index = make_split(data, cfg.data, cfg.train.seed).unlabeled[:args.images]
    coarse = predict_labels(load_coarse_model(args.checkpoint, cfg.model, data.num_classes), data.images[index])
    truth, train_shape = data.masks[index], tuple(data.masks.shape[-2:])
    sources = [native_pair(data, int(i))[0] if cfg.sam.native_resolution else data.images[i] for i in index]
    rgb = [to_uint8_rgb(im) for im in sources]
    prompt_maps = [to_native(c, im.shape, data.num_classes, args.min_size) for c, im in zip(coarse, sources)]

    def row(name: str, maps: list[np.ndarray], seconds: float | None = None) -> str:
        per_class = np.nanmean([image_dice(m, t, data.num_classes) for m, t in zip(maps, truth)], 0)
        time_text = f"{seconds:.1f}" if seconds is not None else "-"
        return (f"| {name} | {np.nanmean(per_class):.3f} | " + " | ".join(f"{v:.3f}" for v in per_class)
                + f" | {time_text} |")

    sam_sizes = sorted({f"{im.shape[0]}×{im.shape[1]}" for im in sources})
    print(f"`python {' '.join(sys.argv)}`: {len(index)} unlabeled images of {cfg.data.name}, trained at "
          f"{train_shape[0]}×{train_shape[1]}, SAM sees {', '.join(sam_sizes)}; SAM {', '.join(models)}\n")
    print("| pseudo-labels | Dice mean | " + " | ".join(data.classes[1:]) + " | decoder s |")
    print("|---|---|" + "---|" * (data.num_classes - 1) + "---|")
    print(row("coarse U-Net", list(coarse)), flush=True)
    encoder_s, figure_maps = {}, None
    for model_type in models:
        sam = build_sam(model_type, cfg.sam.checkpoint if model_type == cfg.sam.model_type else "")
        encoder_s[model_type], results = refine_variants(sam, rgb, prompt_maps, data.num_classes, train_shape)
        for (policy, two_stage), (maps, seconds) in results.items():
            prompting = "box then points + mask" if two_stage else "box only"
            print(row(f"{NAMES.get(model_type, model_type)}, {policy} component(s), {prompting}", maps, seconds),
                  flush=True)
        if model_type == cfg.sam.model_type:
            wanted = (cfg.sam.components, cfg.sam.two_stage and not spec_of(sam).box_only)
            figure_maps = results[wanted][0]
    print("\nImage encoder, once per model: " + ", ".join(f"{m} {s:.0f} s" for m, s in encoder_s.items()))
    if args.figure and figure_maps is not None:
        save_figure(args.figure, rgb, truth, coarse, figure_maps)


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
