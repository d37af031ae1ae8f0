"""A quality gate for SAM pseudo-labels, chosen on val, never on test (issue 13).

Keuth et al. 2024 (arXiv 2411.12602; multimodallearning/SamCarriesTheBurden) use every refined
mask. On our data SAM made the masks worse (docs/RESULTS.md), and a method that trains on its
pseudo-labels cannot notice. The gate keeps SAM only where it helps, decided on data that model
selection may already use:

1. **Per class, on val.** The coarse model's masks of the val images are refined; a class takes
   SAM's masks only if that raises its val Dice over the coarse masks (`decide`). Classes are
   dropped one at a time, worst first, until every class left strictly gains, with the final
   combination (so the classes' interplay is counted): on val, every class's Dice of the gated
   pseudo-labels is then >= the coarse masks', hence so is their mean.
2. **Per image.** Where a class takes SAM, an image uses its refined mask only if SAM's
   predicted IoU (`sam.gate_min_score`) and the refined mask's IoU with the coarse one
   (`sam.gate_min_agreement`) pass; otherwise that image keeps its coarse mask for the class.
   Both thresholds act on val too, before the per-class Dice is measured.

`combine` builds a label map from the two: a class that keeps its coarse mask keeps exactly
those pixels; a class that takes SAM gets SAM's pixels except those.

Hyperparameters (sam/config.py):
- gate_min_score = 0.5: SAM's automatic mask generator drops masks under a predicted IoU of 0.88
  (`pred_iou_thresh`, segment_anything/automatic_mask_generator.py) when nothing tells it where
  to look; a box from the coarse model does, so the bar here is lower: a mask SAM itself
  expects to overlap its object by less than half is not used.
- gate_min_agreement = 0.5: the IoU at which PASCAL VOC and COCO count a detection as the
  object; a refinement moves a boundary, and below that SAM segmented something else.

Deviations:
- Dice for the gate counts an image where a class is absent from the truth and the prediction
  as 1 (a correct empty prediction), not NaN as `sam.store.image_dice` does, so that both
  masks are averaged over the same val images.
- The val Dice is a mean over images of per-image Dice (as `sam/dice_before` and
  `sam/dice_after` are logged), not one Dice pooled over all val pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from semiseg.errors import SemisegError


def agreement(refined: np.ndarray, coarse: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) IoU of each class between two label maps; NaN for the background and for
    a class in neither map."""
    out = np.full(num_classes, np.nan, dtype=np.float32)
    for c in range(1, num_classes):
        a, b = refined == c, coarse == c
        union = int((a | b).sum())
        if union:
            out[c] = float((a & b).sum()) / union
    return out


def sam_classes(scores: np.ndarray, agreements: np.ndarray, allowed: Iterable[int],
                min_score: float, min_agreement: float) -> list[int]:
    """Classes of one image whose refined mask is used: allowed (by the val decision), with SAM's
    predicted IoU and the agreement at or above their thresholds (a class SAM got no prompt
    for has a NaN score, so it keeps its coarse mask)."""
    return [c for c in allowed if scores[c] >= min_score and agreements[c] >= min_agreement]


def combine(coarse: np.ndarray, refined: np.ndarray, use: Iterable[int], num_classes: int) -> np.ndarray:
    """The label map where the classes in `use` take the refined mask and every other class
    keeps its coarse mask (those pixels win: they are what the coarse model said)."""
    use = set(use)
    coarse_classes = [c for c in range(1, num_classes) if c not in use]
    keep = np.isin(coarse, coarse_classes)
    from_sam = np.isin(refined, sorted(use))
    return np.where(keep, coarse, np.where(from_sam, refined, 0)).astype(np.uint8)


def gate_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes - 1,) Dice per foreground class, 1 where a class is in neither map."""
    out = np.ones(num_classes - 1, dtype=np.float64)
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        total = int(p.sum() + t.sum())
        if total:
            out[c - 1] = 2.0 * float((p & t).sum()) / total
    return out


@dataclass
class GateDecision:
    """Per foreground class (index c - 1 for class c): SAM used or not, and the val Dice of the
    coarse masks, of SAM's masks as refined, and of the gated pseudo-labels."""

    classes: list[str]
    use_sam: list[bool]
    dice_coarse: list[float]
    dice_sam: list[float]
    dice_gated: list[float]
    val_images: int
    min_score: float
    min_agreement: float
    image_pass: list[float] = field(default_factory=list)
    """Per class, the fraction of val images whose refined mask passed the per-image gate."""

    def accepted(self) -> list[int]:
        """Class ids whose refined masks the unlabeled images may use."""
        return [c for c, use in enumerate(self.use_sam, start=1) if use]

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: sam/gate/<class>/{use_sam, dice_coarse, dice_sam, dice_gated}."""
        out: dict[str, float] = {}
        for i, name in enumerate(self.classes):
            out[f"sam/gate/{name}/use_sam"] = float(self.use_sam[i])
            for key in ("dice_coarse", "dice_sam", "dice_gated", "image_pass"):
                value = getattr(self, key)[i] if getattr(self, key) else math.nan
                if not math.isnan(value):
                    out[f"sam/gate/{name}/{key}"] = float(value)
        out["sam/gate/val_images"] = float(self.val_images)
        return out

    def table(self) -> str:
        """One line per class, for the pseudolabel log."""
        return "\n".join(
            f"  {name}: {'SAM' if use else 'coarse'} (val Dice coarse {dc:.3f}, SAM {ds:.3f}, "
            f"gated {dg:.3f}; {ip:.0%} of val images pass the per-image gate)"
            for name, use, dc, ds, dg, ip in zip(self.classes, self.use_sam, self.dice_coarse,
                                                 self.dice_sam, self.dice_gated, self.image_pass))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "GateDecision":
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise SemisegError(f"{where}: not a gate decision ({exc}); delete it to decide again") from None


def decide(coarse: list[np.ndarray], refined: list[np.ndarray], scores: np.ndarray,
           truth: list[np.ndarray], classes: list[str], min_score: float,
           min_agreement: float) -> GateDecision:
    """The gate's decision from the val images' coarse and refined label maps (training size),
    SAM's predicted IoU per image and class (N, num_classes; NaN without a prompt) and the
    val masks."""
    n, k = len(coarse), len(classes)
    if n == 0:
        raise SemisegError("the SAM quality gate (sam.gate) needs val images to decide on; the split "
                           "has none (raise data.val_fraction or set sam.gate=false)")
    agree = np.stack([agreement(r, c, k) for r, c in zip(refined, coarse)])
    dice_coarse = np.mean([gate_dice(c, t, k) for c, t in zip(coarse, truth)], axis=0)
    dice_sam = np.mean([gate_dice(r, t, k) for r, t in zip(refined, truth)], axis=0)
    allowed = set(range(1, k))
    while True:
        dice = np.mean([gate_dice(combine(c, r, sam_classes(scores[i], agree[i], allowed, min_score,
                                                            min_agreement), k), t, k)
                        for i, (c, r, t) in enumerate(zip(coarse, refined, truth))], axis=0)
        gains = {c: dice[c - 1] - dice_coarse[c - 1] for c in allowed}
        worst = min(gains, key=lambda c: (gains[c], c), default=None)
        if worst is None or gains[worst] > 0:
            break
        allowed.discard(worst)  # one at a time: dropping it changes the others' pixels
    passed = [float(np.mean([scores[i, c] >= min_score and agree[i, c] >= min_agreement
                             for i in range(n)])) for c in range(1, k)]
    return GateDecision(classes[1:], [c in allowed for c in range(1, k)], dice_coarse.tolist(),
                        dice_sam.tolist(), dice.tolist(), n, min_score, min_agreement, passed)
