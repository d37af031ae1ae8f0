"""Batched SAM refinement of coarse masks (Keuth et al. 2024, "SAM Carries the Burden",
arXiv 2411.12602): prompts from a coarse U-Net mask, two-stage prompting, overlaps resolved by
SAM's own score.

Why it is fast: the reference way (`SamPredictor.set_image` + `predict` per prompt) resizes on
the CPU with PIL, runs the image encoder one image at a time and the decoder one prompt at a
time. Here the resize runs on the accelerator, the encoder takes a batch of images, and the
decoder takes all prompts of an image (with the same number of points) in one call, under bf16
autocast on CUDA. The modules and their order of operations are the official ones, so the masks
match the reference (measured in bench/sam_throughput.py).

Two stages (the paper's refinement): stage 1 prompts SAM with the component's box; stage 2 with
the positive point, the negative points and stage 1's low-resolution logits as a mask prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.sam.compat import ensure_sam_imports
from semiseg.sam.prompts import Prompt, prompts_from_mask


@dataclass
class Refined:
    """A refined label map and SAM's predicted IoU per class (classes without a prompt absent)."""

    labels: np.ndarray
    class_scores: dict[int, float] = field(default_factory=dict)


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """A normalised grey image (H, W) as the 8-bit RGB SAM was trained on: 1st-99th
    percentile window, so one bright outlier cannot flatten the contrast."""
    lo, hi = np.percentile(image, [1, 99])
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.repeat(np.round(scaled).astype(np.uint8)[..., None], 3, axis=-1)


def resolve_overlaps(masks: np.ndarray, scores: np.ndarray, class_ids: list[int],
                     shape: tuple[int, int]) -> np.ndarray:
    """Label map where each pixel takes the class of the highest-scoring mask that covers it."""
    labels = np.zeros(shape, dtype=np.uint8)
    if len(class_ids) == 0:
        return labels
    weighted = np.where(masks, scores[:, None, None], -np.inf)
    best = weighted.argmax(0)
    covered = masks.any(0)
    labels[covered] = np.asarray(class_ids, dtype=np.uint8)[best[covered]]
    return labels


def class_scores(prompts: list[Prompt], scores: np.ndarray) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for prompt, score in zip(prompts, scores.tolist()):
        out.setdefault(prompt.class_id, []).append(score)
    return {c: float(np.mean(v)) for c, v in out.items()}


class SamRefiner:
    """Refines coarse label maps of a batch of images with one SAM."""

    def __init__(self, sam: nn.Module, device: torch.device | str = "cpu", two_stage: bool = True,
                 encoder_batch: int = 8) -> None:
        ensure_sam_imports()
        from segment_anything.utils.transforms import ResizeLongestSide

        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        self.two_stage = two_stage
        self.encoder_batch = encoder_batch
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Image embeddings (B, C, h, w) of uint8 RGB images, and each one's resized size."""
        inputs, sizes = [], []
        for image in images:
            x = torch.from_numpy(np.array(image)).to(self.device).permute(2, 0, 1)[None].float()
            size = self.transform.get_preprocess_shape(image.shape[0], image.shape[1],
                                                       self.transform.target_length)
            # Round back to 8 bits: the reference resizes a uint8 PIL image.
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
            inputs.append(self.sam.preprocess(x.round().clamp(0, 255)))
            sizes.append(size)
        batch = torch.cat(inputs)
        chunks = []
        with self._autocast():
            for start in range(0, len(batch), self.encoder_batch):
                chunks.append(self.sam.image_encoder(batch[start:start + self.encoder_batch]).float())
        return torch.cat(chunks), sizes

    @torch.no_grad()
    def _decode(self, embedding: Tensor, boxes: Tensor | None, points: tuple[Tensor, Tensor] | None,
                mask_input: Tensor | None) -> tuple[Tensor, Tensor]:
        with self._autocast():
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            low, iou = self.sam.mask_decoder(
                image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=False)
        return low.float(), iou.float()[:, 0]

    def decode(self, embedding: Tensor, prompts: list[Prompt], original: tuple[int, int],
               resized: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Binary masks (N, H, W) and SAM's IoU predictions (N,) for an image's prompts."""
        boxes = torch.tensor([p.box for p in prompts], dtype=torch.float32, device=self.device)
        low, iou = self._decode(embedding, self.transform.apply_boxes_torch(boxes, original), None, None)
        if self.two_stage:
            low, iou = self._second_stage(embedding, prompts, original, low, iou)
        masks = self.sam.postprocess_masks(low, resized, original) > self.sam.mask_threshold
        return masks[:, 0].cpu().numpy(), iou.cpu().numpy()

    def _second_stage(self, embedding: Tensor, prompts: list[Prompt], original: tuple[int, int],
                      low: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Points + stage-1 logits, one decoder call per group of prompts with equal point counts
        (padding with SAM's "not a point" would change the tokens and the result)."""
        low, iou = low.clone(), iou.clone()
        counts = [1 + len(p.negatives) for p in prompts]
        for count in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == count]
            coords = np.stack([prompts[i].points()[0] for i in idx])
            labels = np.stack([prompts[i].points()[1] for i in idx])
            coords_t = self.transform.apply_coords_torch(torch.from_numpy(coords).to(self.device), original)
            points = (coords_t, torch.from_numpy(labels).to(self.device))
            low[idx], iou[idx] = self._decode(embedding, None, points, low[idx])
        return low, iou

    def refine(self, images: list[np.ndarray], coarse: list[np.ndarray], num_classes: int,
               policy: str = "largest", min_size: int = 1) -> list[Refined]:
        """Refined label maps for uint8 RGB images and their coarse label maps."""
        embeddings, sizes = self.embed(images)
        out = []
        for i, (image, mask) in enumerate(zip(images, coarse)):
            prompts = prompts_from_mask(mask, num_classes, policy, min_size)
            shape = image.shape[:2]
            if not prompts:
                out.append(Refined(np.zeros(shape, dtype=np.uint8)))
                continue
            masks, scores = self.decode(embeddings[i:i + 1], prompts, shape, sizes[i])
            labels = resolve_overlaps(masks, scores, [p.class_id for p in prompts], shape)
            out.append(Refined(labels, class_scores(prompts, scores)))
        return out


def naive_refine(predictor: object, image: np.ndarray, prompts: list[Prompt], two_stage: bool = True,
                 ) -> Refined:
    """The reference way, `SamPredictor.set_image` then `predict` per prompt: the baseline
    bench/sam_throughput.py compares against, and the oracle the tests check batching with."""
    predictor.set_image(image)  # type: ignore[attr-defined]
    masks, scores = [], []
    for p in prompts:
        m, s, low = predictor.predict(box=np.array(p.box), multimask_output=False)  # type: ignore[attr-defined]
        if two_stage:
            coords, labels = p.points()
            m, s, low = predictor.predict(point_coords=coords, point_labels=labels,  # type: ignore[attr-defined]
                                          mask_input=low, multimask_output=False)
        masks.append(m[0])
        scores.append(float(s[0]))
    shape = image.shape[:2]
    if not prompts:
        return Refined(np.zeros(shape, dtype=np.uint8))
    score_arr = np.array(scores, dtype=np.float32)
    labels = resolve_overlaps(np.stack(masks), score_arr, [p.class_id for p in prompts], shape)
    return Refined(labels, class_scores(prompts, score_arr))
