"""P2: SAM refinement, the naive SamPredictor loop against semiseg's batched refiner on the same
images, prompts and model (bench/sam_throughput.py's functions), with the mask IoU between them.

Weights: MobileSAM (`vit_t`) from `checkpoint` (or semiseg's cache), or, with
checkpoint="random", MobileSAM's architecture with random weights: the same arithmetic, so the
same img/s, but its IoU then only says the two code paths agree on an untrained model. Smoke
mode uses `tiny` (64x64 input, random weights).
"""

from __future__ import annotations

from typing import Any

import torch

import sam_throughput
from device_parts.sizes import Sizes
from semiseg.sam.compat import ensure_sam_imports
from semiseg.sam.models import build_sam


def sam_model(model_type: str, checkpoint: str) -> tuple[torch.nn.Module, str]:
    """The model and a word on its weights."""
    ensure_sam_imports()
    if model_type == "vit_t" and checkpoint == "random":
        from mobile_sam import sam_model_registry

        torch.manual_seed(0)
        return sam_model_registry["vit_t"](checkpoint=None).eval(), "random (architecture only)"
    words = "random (tiny test model)" if model_type == "tiny" else f"official ({checkpoint or 'cache'})"
    return build_sam(model_type, checkpoint), words


def run(sizes: Sizes, device: torch.device, checkpoint: str) -> dict[str, Any]:
    model, weights = sam_model(sizes.sam_model, checkpoint)
    model = model.to(device)
    torch.manual_seed(0)
    images, coarse = sam_throughput.inputs(sizes.sam_images, sizes.sam_size)
    naive_rate, naive = sam_throughput.run_naive(model, images, coarse, device)
    per_image_rate, _ = sam_throughput.run_batched(model, images, coarse, device, sizes.sam_batch,
                                                   cross_image=False)
    batched_rate, batched = sam_throughput.run_batched(model, images, coarse, device, sizes.sam_batch)
    return {"model_type": sizes.sam_model, "weights": weights, "images": sizes.sam_images,
            "size": sizes.sam_size, "batch": sizes.sam_batch,
            "naive_img_s": naive_rate, "per_image_decoder_img_s": per_image_rate, "batched_img_s": batched_rate,
            "speedup": batched_rate / naive_rate,
            "mask_iou": sam_throughput.mask_iou(batched, naive),
            "target": "speedup >= 10 at mask IoU >= 0.99"}


def markdown(result: dict[str, Any]) -> list[str]:
    return [
        f"{result['images']} images of {result['size']}², encoder batch {result['batch']}, "
        f"SAM {result['model_type']}, weights {result['weights']}",
        "",
        "| way | img/s | speed-up | mask IoU to naive |", "|---|---|---|---|",
        f"| naive SamPredictor loop | {result['naive_img_s']:.2f} | 1.00× | 1.0000 |",
        *([f"| semiseg batched, one decoder call per image | {result['per_image_decoder_img_s']:.2f} | "
           f"{result['per_image_decoder_img_s'] / result['naive_img_s']:.2f}× | |"]
          if "per_image_decoder_img_s" in result else []),
        f"| semiseg batched refiner (decoder across images) | {result['batched_img_s']:.2f} | "
        f"{result['speedup']:.2f}× | {result['mask_iou']:.4f} |",
    ]
