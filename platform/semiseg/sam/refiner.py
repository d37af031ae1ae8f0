"""Batched SAM refinement of coarse masks (Keuth et al. 2024, "SAM Carries the Burden",
arXiv 2411.12602): prompts from a coarse U-Net mask, two-stage prompting, overlaps resolved by
SAM's own score.

Why it is fast: the reference way (`SamPredictor.set_image` + `predict` per prompt) resizes on
the CPU with PIL, runs the image encoder one image at a time and the decoder one prompt at a
time. Here the resize runs on the accelerator, the encoder takes a batch of images, and the
decoder takes the prompts of *all* images of the batch in one call (`decode_gathered`), under
bf16 autocast on CUDA. The modules and their order of operations are the official ones, so the
masks match the reference (mask IoU >= 0.99, tests/sam/test_refiner.py, bench/sam_throughput.py).

Cross-image decoding: the official `MaskDecoder.predict_masks` takes one image's embedding and
repeats it once per prompt (`torch.repeat_interleave(image_embeddings, n_prompts, dim=0)`).
`decode_gathered` is that function with the repeat replaced by a gather, `embeddings[owner]`,
where `owner[k]` is the image of prompt k; everything after it is the official code, line for
line. LiteMedSAM's vendored decoder made the same change (it skips the repeat when there is one
embedding per prompt).

Two stages (the paper's refinement): stage 1 prompts SAM with the component's box; stage 2 with
the positive point, the negative points and stage 1's low-resolution logits as a mask prompt.
Box-only models (MedSAM, LiteMedSAM: `SamSpec.box_only`) were trained on boxes alone, so for
them the refiner runs stage 1 only, whatever `two_stage` asks.

Input per model (`semiseg.sam.models.SamSpec`, from each model's official inference script):
SAM/MobileSAM resize the longer side to 1024 and normalise with ImageNet statistics;
LiteMedSAM resizes the longer side to 256, min-max stretches and pads; MedSAM ViT-B stretches to
1024x1024 and min-max stretches, and its logits are resized straight to the image size.

Deviations:
- Resizing is antialiased bilinear on the device for every model (official: PIL bilinear for
  SAM, cv2 INTER_AREA for LiteMedSAM, skimage bicubic for MedSAM), rounded back to 8 bits.
- Box and point coordinates are scaled as floats (SamPredictor's way); LiteMedSAM's script
  truncates boxes to integers in its 256 frame.
- MedSAM ViT-B's masks threshold the resized logits at 0; MedSAM_Inference.py resizes the
  sigmoid and thresholds at 0.5 (the same mask up to interpolation at the boundary).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.sam.compat import ensure_sam_imports
from semiseg.sam.models import SamSpec, spec_of
from semiseg.sam.prompts import Prompt, prompts_from_mask

log = logging.getLogger(__name__)


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


def input_size(spec: SamSpec, shape: tuple[int, int], img_size: int) -> tuple[int, int]:
    """(h, w) an image of `shape` is resized to before padding to img_size x img_size."""
    if spec.resize == "square":
        return img_size, img_size
    scale = img_size / max(shape)  # ResizeLongestSide.get_preprocess_shape, LiteMedSAM's resize_longest_side
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def decode_gathered(decoder: nn.Module, embeddings: Tensor, owner: Tensor, image_pe: Tensor,
                    sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
    """`MaskDecoder.forward(..., multimask_output=False)` for prompts of several images: prompt
    k reads `embeddings[owner[k]]`. Official segment_anything/modeling/mask_decoder.py otherwise."""
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)

    # The one change: gather each prompt's image embedding (official: repeat_interleave of one).
    src = embeddings.index_select(0, owner) + dense
    pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
    b, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:(1 + decoder.num_mask_tokens), :]

    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled_embedding = decoder.output_upscaling(src)
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                            for i in range(decoder.num_mask_tokens)], dim=1)
    b, c, h, w = upscaled_embedding.shape
    masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    return masks[:, 0:1], iou_pred[:, 0:1]  # multimask_output=False: the first mask token


@dataclass
class _Batch:
    """All prompts of a batch of images, flattened, with the image each belongs to."""

    prompts: list[Prompt]
    owner: Tensor      # (N,) image index of each prompt
    scale: Tensor      # (N, 2) x, y factors from original pixels to the model's input frame
    per_image: list[list[int]]  # positions in `prompts` of each image's prompts


class SamRefiner:
    """Refines coarse label maps of a batch of images with one SAM.

    encoder_batch: images per image-encoder call; decoder_batch: prompts per decoder call (the
    decoder's memory grows with it: 64 prompts of a 64x64x256 embedding are ~270 MB in fp32).
    cross_image=False decodes each image's prompts in a call of their own (the previous way,
    kept to measure what cross-image batching buys: bench/sam_throughput.py).
    """

    def __init__(self, sam: nn.Module, device: torch.device | str = "cpu", two_stage: bool = True,
                 encoder_batch: int = 8, decoder_batch: int = 64, cross_image: bool = True) -> None:
        ensure_sam_imports()
        from segment_anything.utils.transforms import ResizeLongestSide

        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        self.spec = spec_of(sam)
        self.two_stage = two_stage and not self.spec.box_only
        if two_stage and self.spec.box_only:
            log.info("this SAM was trained on box prompts only: refining with boxes, no second stage")
        self.encoder_batch = encoder_batch
        self.decoder_batch = decoder_batch
        self.cross_image = cross_image
        self.img_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)  # what naive SamPredictor uses (the reference)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _model_input(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        x = torch.from_numpy(np.array(image)).to(self.device).permute(2, 0, 1)[None].float()
        size = input_size(self.spec, image.shape[:2], self.img_size)
        # Round back to 8 bits: every reference resizes a uint8 image.
        x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True).round().clamp(0, 255)
        if self.spec.intensity == "minmax":  # MedSAM/LiteMedSAM: (x - min) / max(max - min, 1e-8)
            lo, hi = x.amin(), x.amax()
            x = (x - lo) / (hi - lo).clamp(min=1e-8) * 255  # the model's pixel_std of 255 maps it to [0, 1]
        return self.sam.preprocess(x), size

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Image embeddings (B, C, h, w) of uint8 RGB images, and each one's resized size."""
        inputs, sizes = zip(*(self._model_input(image) for image in images))
        batch = torch.cat(inputs)
        chunks = []
        with self._autocast():
            for start in range(0, len(batch), self.encoder_batch):
                chunks.append(self.sam.image_encoder(batch[start:start + self.encoder_batch]).float())
        return torch.cat(chunks), list(sizes)

    def _flatten(self, per_image: list[list[Prompt]], originals: list[tuple[int, int]],
                 sizes: list[tuple[int, int]]) -> _Batch:
        prompts, owner, scale, positions = [], [], [], []
        for i, image_prompts in enumerate(per_image):
            (oh, ow), (nh, nw) = originals[i], sizes[i]
            positions.append(list(range(len(prompts), len(prompts) + len(image_prompts))))
            prompts += image_prompts
            owner += [i] * len(image_prompts)
            scale += [(nw / ow, nh / oh)] * len(image_prompts)  # ResizeLongestSide.apply_coords
        return _Batch(prompts, torch.tensor(owner, dtype=torch.long, device=self.device),
                      torch.tensor(scale, dtype=torch.float32, device=self.device).reshape(-1, 2), positions)

    @torch.no_grad()
    def _decode(self, embeddings: Tensor, owner: Tensor, boxes: Tensor | None,
                points: tuple[Tensor, Tensor] | None, mask_input: Tensor | None) -> tuple[Tensor, Tensor]:
        """Low-res logits (N, 1, h, w) and predicted IoU (N,), decoder_batch prompts per call."""
        lows, ious = [], []
        pe = self.sam.prompt_encoder.get_dense_pe()
        for start in range(0, len(owner), self.decoder_batch):
            part = slice(start, start + self.decoder_batch)
            with self._autocast():
                sparse, dense = self.sam.prompt_encoder(
                    points=None if points is None else (points[0][part], points[1][part]),
                    boxes=None if boxes is None else boxes[part],
                    masks=None if mask_input is None else mask_input[part])
                low, iou = decode_gathered(self.sam.mask_decoder, embeddings, owner[part], pe, sparse, dense)
            lows.append(low.float())
            ious.append(iou.float()[:, 0])
        return torch.cat(lows), torch.cat(ious)

    def _second_stage(self, embeddings: Tensor, batch: _Batch, low: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Points + stage-1 logits, one call per group of prompts (from any image) with equal
        point counts (padding with SAM's "not a point" would change the tokens and the result)."""
        low, iou = low.clone(), iou.clone()
        counts = [1 + len(p.negatives) for p in batch.prompts]
        for count in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == count]
            coords = torch.from_numpy(np.stack([batch.prompts[i].points()[0] for i in idx])).to(self.device)
            labels = torch.from_numpy(np.stack([batch.prompts[i].points()[1] for i in idx])).to(self.device)
            where = torch.tensor(idx, device=self.device)
            coords = coords * batch.scale[where][:, None, :]
            low[where], iou[where] = self._decode(embeddings, batch.owner[where], None, (coords, labels), low[where])
        return low, iou

    def _postprocess(self, low: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
        if self.spec.resize == "square":  # MedSAM: logits straight to the image size
            return F.interpolate(low, original, mode="bilinear", align_corners=False)
        return self.sam.postprocess_masks(low, resized, original)

    @torch.no_grad()
    def decode_images(self, embeddings: Tensor, per_image: list[list[Prompt]], originals: list[tuple[int, int]],
                      sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Binary masks (n_i, H_i, W_i) and predicted IoUs (n_i,) for each image's prompts, with
        the decoder run across all images at once."""
        batch = self._flatten(per_image, originals, sizes)
        if not batch.prompts:
            return [(np.zeros((0, *o), dtype=bool), np.zeros(0, dtype=np.float32)) for o in originals]
        boxes = torch.tensor([p.box for p in batch.prompts], dtype=torch.float32, device=self.device)
        low, iou = self._decode(embeddings, batch.owner, boxes * batch.scale.repeat(1, 2), None, None)
        if self.two_stage:
            low, iou = self._second_stage(embeddings, batch, low, iou)
        out = []
        for i, positions in enumerate(batch.per_image):
            if not positions:
                out.append((np.zeros((0, *originals[i]), dtype=bool), np.zeros(0, dtype=np.float32)))
                continue
            where = torch.tensor(positions, dtype=torch.long, device=self.device)
            masks = self._postprocess(low[where], sizes[i], originals[i]) > self.sam.mask_threshold
            out.append((masks[:, 0].cpu().numpy(), iou[where].cpu().numpy()))
        return out

    def decode(self, embedding: Tensor, prompts: list[Prompt], original: tuple[int, int],
               resized: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Binary masks (N, H, W) and SAM's IoU predictions (N,) for one image's prompts."""
        return self.decode_images(embedding, [prompts], [original], [resized])[0]

    def refine(self, images: list[np.ndarray], coarse: list[np.ndarray], num_classes: int,
               policy: str = "largest", min_size: int = 1) -> list[Refined]:
        """Refined label maps for uint8 RGB images and their coarse label maps."""
        embeddings, sizes = self.embed(images)
        return self.refine_embedded(embeddings, sizes, [tuple(im.shape[:2]) for im in images], coarse,
                                    num_classes, policy, min_size)

    def refine_embedded(self, embeddings: Tensor, sizes: list[tuple[int, int]], originals: list[tuple[int, int]],
                        coarse: list[np.ndarray], num_classes: int, policy: str = "largest",
                        min_size: int = 1) -> list[Refined]:
        """`refine` on embeddings from `embed` (so several prompting variants share one encoder run)."""
        per_image = [prompts_from_mask(mask, num_classes, policy, min_size) for mask in coarse]
        if self.cross_image:
            decoded = self.decode_images(embeddings, per_image, originals, sizes)
        else:
            decoded = [self.decode(embeddings[i:i + 1], per_image[i], originals[i], sizes[i])
                       for i in range(len(coarse))]
        out = []
        for prompts, shape, (masks, scores) in zip(per_image, originals, decoded):
            if not prompts:
                out.append(Refined(np.zeros(shape, dtype=np.uint8)))
                continue
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
