"""SAM refinement throughput: the reference loop against semiseg's batched refiner, on the same
images, prompts and model, side by side in one process.

    python bench/sam_throughput.py                                   # CPU, 8 images
    python bench/sam_throughput.py --device cuda --images 256        # one GPU
    python bench/sam_throughput.py --device cuda --images 1024 --actors 1 2 4   # + Ray Data actors

- naive:   `SamPredictor.set_image` + `predict` per prompt per image (the reference way), two
           stages per prompt (box, then points + stage-1 logits), fp32;
- batched: `semiseg.sam.refiner.SamRefiner`: resize on the device, the image encoder on a batch,
           the decoder on all prompts of an image per call, bf16 autocast on CUDA;
- ray:     (with --actors) the pipeline's SAM stage as Ray Data actors, one GPU share each.

Images are `synthetic` phantoms at --size (default 512) with 3 foreground classes; coarse masks
are their ground truth degraded (dilated, holes, shifted), so every method gets the same prompts.
Prints a Markdown table: img/s, speed-up over naive, and mask IoU to the naive masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy import ndimage

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.sam.compat import ensure_sam_imports
from semiseg.sam.models import build_sam
from semiseg.sam.prompts import prompts_from_mask
from semiseg.sam.refiner import Refined, SamRefiner, naive_refine, to_uint8_rgb


def inputs(n: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    data = load_dataset(load_config(None, [f"data.image_size={size}", f"data.num_images={n}"]).data)
    rng = np.random.default_rng(0)
    coarse = []
    for mask in data.masks:
        degraded = np.zeros_like(mask)
        for c in range(1, data.num_classes):
            blob = ndimage.binary_dilation(mask == c, iterations=max(1, size // 128))
            degraded[np.roll(blob & (rng.random(mask.shape) > 0.2), size // 100, axis=1)] = c
        coarse.append(degraded)
    return [to_uint8_rgb(im) for im in data.images], coarse


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_naive(sam: torch.nn.Module, images: list, coarse: list, device: torch.device) -> tuple[float, list]:
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    naive_refine(predictor, images[0], prompts_from_mask(coarse[0], 4))  # warm-up
    sync(device)
    start = time.perf_counter()
    out = [naive_refine(predictor, im, prompts_from_mask(cm, 4)) for im, cm in zip(images, coarse)]
    sync(device)
    return len(images) / (time.perf_counter() - start), out


def run_batched(sam: torch.nn.Module, images: list, coarse: list, device: torch.device,
                batch: int) -> tuple[float, list]:
    refiner = SamRefiner(sam, device, encoder_batch=batch)
    refiner.refine(images[:batch], coarse[:batch], 4)  # warm-up
    sync(device)
    start = time.perf_counter()
    out: list[Refined] = []
    for i in range(0, len(images), batch):
        out += refiner.refine(images[i:i + batch], coarse[i:i + batch], 4)
    sync(device)
    return len(images) / (time.perf_counter() - start), out


def run_ray(actors: int, images: list, coarse: list, args: argparse.Namespace) -> float:
    import ray

    from semiseg.distributed.pseudolabel import SamStage, sam_checkpoint
    from semiseg.sam.config import SamConfig

    gpus = 1.0 if args.device == "cuda" else 0.0
    cfg = SamConfig(batch_size=args.batch, num_actors=actors, gpus_per_actor=gpus)
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_items([{"rgb": im, "coarse": cm} for im, cm in zip(images, coarse)]).materialize()
    kwargs = {"sam_cfg": vars(cfg), "checkpoint": sam_checkpoint(cfg), "num_classes": 4}
    start = time.perf_counter()
    ds.map_batches(SamStage, fn_constructor_kwargs=kwargs, concurrency=actors, num_gpus=gpus,
                   num_cpus=0.5, batch_size=args.batch).materialize()
    return len(images) / (time.perf_counter() - start)  # includes actor start-up


def mask_iou(a: list[Refined], b: list[Refined]) -> float:
    """Mean over images and present classes of the IoU between two sets of label maps."""
    scores = []
    for x, y in zip(a, b):
        for c in range(1, 4):
            union = ((x.labels == c) | (y.labels == c)).sum()
            if union:
                scores.append(((x.labels == c) & (y.labels == c)).sum() / union)
    return float(np.mean(scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--actors", type=int, nargs="*", default=[])
    args = p.parse_args()
    ensure_sam_imports()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images, coarse = inputs(args.images, args.size)
    sam = build_sam("vit_t").to(device)
    naive_rate, naive = run_naive(sam, images, coarse, device)
    batched_rate, batched = run_batched(sam, images, coarse, device, args.batch)
    rows = [("naive SamPredictor loop", naive_rate, 1.0), ("semiseg batched refiner", batched_rate, mask_iou(batched, naive))]
    print(f"`{' '.join(['python', *sys.argv])}` on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {args.images} images of {args.size}², MobileSAM\n")
    print("| way | img/s | speed-up | mask IoU to naive |\n|---|---|---|---|")
    for name, rate, iou in rows:
        print(f"| {name} | {rate:.2f} | {rate / naive_rate:.2f}× | {iou:.4f} |")
    for n in args.actors:
        rate = run_ray(n, images, coarse, args)
        print(f"| Ray Data, {n} SAM actor(s) | {rate:.2f} | {rate / naive_rate:.2f}× | |")
    print(json.dumps({"naive_img_s": naive_rate, "batched_img_s": batched_rate,
                      "iou": rows[1][2]}), file=sys.stderr)


if __name__ == "__main__":
    main()
