"""The batched refiner with the real MobileSAM weights: refining a coarse box on a synthetic
blob gives a high Dice, and batching gives the same masks as the reference SamPredictor loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from semiseg.sam.compat import ensure_sam_imports
from semiseg.sam.models import build_sam, tiny_sam
from semiseg.sam.prompts import prompts_from_mask
from semiseg.sam.refiner import SamRefiner, naive_refine, resolve_overlaps, to_uint8_rgb


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def scene(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey image with two blobs, its truth, and a coarse mask like a weak U-Net's: blobby
    (dilated), speckled with holes, and shifted."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[ellipse(truth.shape, 35 + seed, 30, 22, 14)] = 1
    truth[ellipse(truth.shape, 68, 66 - seed, 12, 20)] = 2
    image = rng.normal(0, 0.15, truth.shape) + (truth == 1) * 1.0 + (truth == 2) * 2.0
    coarse = np.zeros_like(truth)
    holes = rng.random(truth.shape) < 0.3
    coarse[ndimage.binary_dilation(truth == 1, iterations=2) & ~holes] = 1
    coarse[np.roll(ndimage.binary_dilation(truth == 2, iterations=3), 2, axis=1) & (coarse == 0)] = 2
    return to_uint8_rgb(image.astype(np.float32)), truth, coarse


@pytest.fixture(scope="module")
def mobilesam() -> torch.nn.Module:
    torch.set_num_threads(2)
    return build_sam("vit_t")


def test_box_prompt_on_a_blob_gives_high_dice(mobilesam: torch.nn.Module) -> None:
    image, truth, coarse = scene(0)
    refined = SamRefiner(mobilesam, two_stage=False).refine([image], [coarse], 3)[0]
    for c in (1, 2):
        assert dice(coarse == c, truth == c) < 0.85
        assert dice(refined.labels == c, truth == c) > 0.95, c
    assert set(refined.class_scores) == {1, 2}


def test_batched_matches_the_samPredictor_loop(mobilesam: torch.nn.Module) -> None:
    ensure_sam_imports()
    from segment_anything import SamPredictor

    scenes = [scene(0), scene(3)]
    batched = SamRefiner(mobilesam).refine([s[0] for s in scenes], [s[2] for s in scenes], 3)
    predictor = SamPredictor(mobilesam)
    for (image, _, coarse), ours in zip(scenes, batched):
        reference = naive_refine(predictor, image, prompts_from_mask(coarse, 3))
        for c in (1, 2):
            a, b = ours.labels == c, reference.labels == c
            assert (a & b).sum() / (a | b).sum() >= 0.99
            assert ours.class_scores[c] == pytest.approx(reference.class_scores[c], abs=0.01)


def test_empty_coarse_mask_gives_background_and_no_scores() -> None:
    image, _, _ = scene(0, size=64)
    out = SamRefiner(tiny_sam()).refine([image], [np.zeros((64, 64), dtype=np.int64)], 3)[0]
    assert out.labels.shape == (64, 64) and not out.labels.any() and out.class_scores == {}


def test_images_of_different_sizes_in_one_batch() -> None:
    small, _, coarse_small = scene(0, size=48)
    large, _, coarse_large = scene(1, size=80)
    out = SamRefiner(tiny_sam()).refine([small, large], [coarse_small, coarse_large], 3)
    assert [o.labels.shape for o in out] == [(48, 48), (80, 80)]


def test_overlaps_go_to_the_higher_score() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :, :3] = True
    masks[1, :, 1:] = True
    labels = resolve_overlaps(masks, np.array([0.6, 0.9]), [1, 2], (4, 4))
    assert labels[:, 0].tolist() == [1] * 4 and (labels[:, 1:] == 2).all()
    assert not resolve_overlaps(masks[:0], np.array([]), [], (4, 4)).any()


def test_uint8_window_ignores_outliers() -> None:
    image = np.zeros((20, 20), dtype=np.float32)
    image[5:15, 5:15] = 1.0
    image[0, 0] = 1000.0  # one hot pixel must not flatten the rest
    rgb = to_uint8_rgb(image)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert rgb[10, 10, 0] == 255 and rgb[1, 1, 0] == 0
