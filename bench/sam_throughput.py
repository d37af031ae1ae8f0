"""SAM refinement throughput: the reference loop against semiseg's batched refiner, on the same
images, prompts and model, side by side in one process.

    python bench/sam_throughput.py                                   # CPU, 8 images, MobileSAM
    python bench/sam_throughput.py --model litemedsam                # LiteMedSAM (box prompts only)
    python bench/sam_throughput.py --device cuda --images 256        # one GPU
    python bench/sam_throughput.py --device cuda --images 1024 --actors 1 2 4   # + Ray Data actors

- naive:   `SamPredictor.set_image` + `predict` per prompt per image (the reference way), two
           stages per prompt (box, then points + stage-1 logits), fp32; for LiteMedSAM its own
           script's loop (`LiteMedSamLoop`: min-max input, one decoder call per box);
- batched, per-image decoder: `semiseg.sam.refiner.SamRefiner(cross_image=False)`: resize on
           the device, the image encoder on a batch, one decoder call per image;
- batched: the same with the decoder on the prompts of the whole batch of images at once
           (embeddings gathered per prompt), bf16 autocast on CUDA;
- encoder only: `SamRefiner.embed` on the same images: the floor the refiner cannot go below;
           its share of the batched time says whether a device is encoder-bound;
- ray:     (with --actors) the pipeline's SAM stage as Ray Data actors, one GPU share each.

Images are `synthetic` phantoms at --size (default 512) with 3 foreground classes; coarse masks
are their ground truth degraded (dilated, holes, shifted), so every method gets the same prompts.
Prints a Markdown table: img/s (wall), CPU seconds per image (this process's, which a shared
machine's other load barely moves), speed-up over naive in both, and mask IoU to the naive
masks; medians over --rounds rounds, each running every way in turn.
bench/device_check.py (P2) imports `inputs`, `run_naive`, `run_batched` and `mask_iou` from here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.sam.compat import ensure_sam_imports
from semiseg.sam.models import build_sam, spec_of
from semiseg.sam.prompts import prompts_from_mask
from semiseg.sam.refiner import (Refined, SamRefiner, class_scores, naive_refine, resolve_overlaps,
                                 to_uint8_rgb)


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


class LiteMedSamLoop:
    """LiteMedSAM's reference way (CVPR24_LiteMedSAM_infer.py, MedSAM_infer_npz_2D): per image,
    the longer side to 256 on the CPU (PIL bilinear here, cv2 INTER_AREA there), min-max to
    [0, 1], pad, encode; then per box (scaled to the 256 frame and truncated) one decoder call,
    postprocess_masks, sigmoid > 0.5. SamPredictor would skip the min-max stretch, which
    LiteMedSAM's masks are sensitive to, so it is no reference for this model."""

    def __init__(self, sam: torch.nn.Module) -> None:
        self.sam = sam

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prompts: list) -> Refined:
        from PIL import Image

        h, w = image.shape[:2]
        scale = 256 / max(h, w)
        new = (int(h * scale + 0.5), int(w * scale + 0.5))
        x = np.asarray(Image.fromarray(image).resize(new[::-1], Image.BILINEAR)).astype(np.float32)
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        x = np.pad(x, ((0, 256 - new[0]), (0, 256 - new[1]), (0, 0)))
        device = self.sam.device
        embedding = self.sam.image_encoder(torch.from_numpy(x).permute(2, 0, 1)[None].to(device))
        masks, scores = [], []
        for p in prompts:
            box = torch.tensor([[[int(v * scale) for v in p.box]]], dtype=torch.float32, device=device)
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=box, masks=None)
            low, iou = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=False)
            masks.append((self.sam.postprocess_masks(low, new, (h, w)) > 0)[0, 0].cpu().numpy())
            scores.append(float(iou[0, 0]))
        if not prompts:
            return Refined(np.zeros((h, w), dtype=np.uint8))
        score_arr = np.array(scores, dtype=np.float32)
        return Refined(resolve_overlaps(np.stack(masks), score_arr, [p.class_id for p in prompts], (h, w)),
                       class_scores(prompts, score_arr))


def naive_way(sam: torch.nn.Module):  # noqa: ANN201
    """The per-image, per-prompt reference loop for this model: image, prompts -> Refined."""
    from segment_anything import SamPredictor

    spec = spec_of(sam)
    if spec.intensity == "minmax" and spec.resize == "longest":
        return LiteMedSamLoop(sam)
    predictor = SamPredictor(sam)
    return lambda image, prompts: naive_refine(predictor, image, prompts, not spec.box_only)


Way = Callable[[list, list], list]


def naive_refiner(sam: torch.nn.Module) -> Way:
    one = naive_way(sam)
    return lambda images, coarse: [one(im, prompts_from_mask(cm, 4)) for im, cm in zip(images, coarse)]


def batched_refiner(sam: torch.nn.Module, device: torch.device, batch: int, cross_image: bool = True) -> Way:
    refiner = SamRefiner(sam, device, encoder_batch=batch, cross_image=cross_image)

    def refine(images: list, coarse: list) -> list:
        out: list[Refined] = []
        for i in range(0, len(images), batch):
            out += refiner.refine(images[i:i + batch], coarse[i:i + batch], 4)
        return out
    return refine


def encoder_only(sam: torch.nn.Module, device: torch.device, batch: int) -> Way:
    """The refiner's resize + image encoder alone (no prompts, no decoder)."""
    refiner = SamRefiner(sam, device, encoder_batch=batch)

    def embed(images: list, coarse: list) -> list:
        for i in range(0, len(images), batch):
            refiner.embed(images[i:i + batch])
        return []
    return embed


def timed(way: Way, images: list, coarse: list, device: torch.device) -> tuple[list, float, float]:
    """The way's output, its wall seconds and this process's CPU seconds (which other
    processes on a shared machine barely move, unlike the wall clock)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = way(images, coarse)
    sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_way(way: Way, images: list, coarse: list, device: torch.device, warmup: int) -> tuple[float, list]:
    way(images[:warmup], coarse[:warmup])
    out, wall, _ = timed(way, images, coarse, device)
    return len(images) / wall, out


def run_naive(sam: torch.nn.Module, images: list, coarse: list, device: torch.device) -> tuple[float, list]:
    """img/s and masks of the reference loop (bench/device_parts/sam.py, P2)."""
    return run_way(naive_refiner(sam), images, coarse, device, 1)


def run_batched(sam: torch.nn.Module, images: list, coarse: list, device: torch.device,
                batch: int, cross_image: bool = True) -> tuple[float, list]:
    """img/s and masks of semiseg's refiner (bench/device_parts/sam.py, P2)."""
    return run_way(batched_refiner(sam, device, batch, cross_image), images, coarse, device, batch)


def interleaved(ways: dict[str, Way], images: list, coarse: list, device: torch.device, batch: int,
                rounds: int) -> tuple[dict[str, tuple[float, float]], dict[str, list]]:
    """Per way, the median over rounds of wall img/s and CPU seconds per image, each round
    running every way once in turn (so a load change on a shared machine hits all alike)."""
    for way in ways.values():
        way(images[:batch], coarse[:batch])  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    outputs: dict[str, list] = {}
    for _ in range(rounds):
        for name, way in ways.items():
            outputs[name], wall, cpu = timed(way, images, coarse, device)
            samples[name].append((len(images) / wall, cpu / len(images)))
    medians = {name: (float(np.median([s[0] for s in v])), float(np.median([s[1] for s in v])))
               for name, v in samples.items()}
    return medians, outputs


def run_ray(actors: int, images: list, coarse: list, args: argparse.Namespace) -> float:
    import ray

    from semiseg.distributed.pseudolabel import SamStage, sam_checkpoint
    from semiseg.sam.config import SamConfig

    gpus = 1.0 if args.device == "cuda" else 0.0
    cfg = SamConfig(model_type=args.model, checkpoint=args.checkpoint, batch_size=args.batch,
                    num_actors=actors, gpus_per_actor=gpus)
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
    p.add_argument("--model", default="vit_t", help="sam.model_type: vit_t (MobileSAM), litemedsam, tiny, ...")
    p.add_argument("--checkpoint", default="", help="sam.checkpoint (default: the model's official weights)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--actors", type=int, nargs="*", default=[])
    args = p.parse_args()
    ensure_sam_imports()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images, coarse = inputs(args.images, args.size)
    sam = build_sam(args.model, args.checkpoint).to(device)
    ways = {"naive": naive_refiner(sam),
            "per_image": batched_refiner(sam, device, args.batch, cross_image=False),
            "batched": batched_refiner(sam, device, args.batch),
            "encoder": encoder_only(sam, device, args.batch)}
    rates, out = interleaved(ways, images, coarse, device, args.batch, args.rounds)
    names = {"naive": f"naive loop ({'its script' if isinstance(naive_way(sam), LiteMedSamLoop) else 'SamPredictor'})",
             "per_image": "semiseg batched, one decoder call per image",
             "batched": "semiseg batched, decoder across images",
             "encoder": "image encoder alone (resize + encoder, no decoder)"}
    stages = "box only" if spec_of(sam).box_only else "box, then points + mask"
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"`{' '.join(['python', *sys.argv])}` on {where}, torch {torch.__version__}, {args.images} images of "
          f"{args.size}², SAM {args.model} ({stages}), median of {args.rounds} interleaved rounds\n")
    print("| way | img/s | speed-up | CPU s/img | speed-up, CPU time | mask IoU to naive |\n|---|---|---|---|---|---|")
    naive_rate, naive_cpu = rates["naive"]
    for key, (rate, cpu) in rates.items():
        iou = f"{mask_iou(out[key], out['naive']):.4f}" if key != "encoder" else ""
        print(f"| {names[key]} | {rate:.2f} | {rate / naive_rate:.2f}× | {cpu:.2f} | {naive_cpu / cpu:.2f}× | {iou} |")
    for n in args.actors:
        rate = run_ray(n, images, coarse, args)
        print(f"| Ray Data, {n} SAM actor(s) | {rate:.2f} | {rate / naive_rate:.2f}× | | | |")
    share = rates["encoder"][1] / rates["batched"][1] if device.type == "cpu" else rates["batched"][0] / rates["encoder"][0]
    print(f"\nThe image encoder takes {share:.0%} of the batched refiner's {'CPU ' if device.type == 'cpu' else ''}time"
          + (": encoder-bound, so batching the decoder cannot win much here." if share > 0.8 else "."))
    print(json.dumps({"model": args.model, "rates": rates, "encoder_share": share,
                      "iou": mask_iou(out["batched"], out["naive"])}), file=sys.stderr)


if __name__ == "__main__":
    main()
