"""Reference-guided pseudo-labels (Seibold, Reiss, Kleesiek & Stiefelhagen, AAAI 2022,
"Reference-guided Pseudo-Label Generation for Medical Semantic Segmentation", arXiv 2112.00735).
No official code was published that we could find; what we follow is the paper's abstract:
"we use a small number of labeled images as reference material and match pixels in an unlabeled
image to the semantics of the best fitting pixel in a reference set", so that labels come from
visual similarity to labeled pixels rather than from the model's own classifier, which is how the
paper avoids the confirmation bias of prediction-based pseudo-labels (see `pseudo_label`).

What runs:
1. **A persistent reference bank over every labeled image.** The trainer hands the method the
   whole labeled set once (`Method.set_labeled_set`). At the start of every epoch the bank is
   rebuilt from all of it with the matching network: from each labeled image, up to
   ceil((bank_size / num_classes) / n_c) random pixels of each class c it contains, where n_c is
   the number of labeled images containing c. So each class gets about bank_size / num_classes
   reference pixels, spread evenly over the images that have it, and every class of every labeled
   image is in the bank (`ReferenceBank`). With `bank_refresh="queue"` (default), each step's
   labeled batch also replaces its own images' entries with the current matcher's features, so
   the bank never lags the matcher by more than the few steps until an image is drawn again.
2. **Matching on a chosen layer** (`feature_layer`): the last decoder map (what the 1x1 head
   classifies), the previous, coarser and twice as wide decoder map upsampled bilinearly, or both
   concatenated. Each part is L2-normalised, so a dot product is a cosine (for "concat", the mean
   of the two layers' cosines).
3. **A k-NN vote with a margin filter.** Every pixel of an unlabeled image (weak view) is matched
   to its k most similar reference pixels by cosine similarity; their similarity-weighted vote
   gives its label, and the pixel is used only when the vote's margin, (winner - runner-up) /
   total weight, is at least `min_margin` (and its best similarity at least
   `similarity_threshold`). The label supervises the model's prediction on the strong view.

Matching scales: similarities are computed in chunks of `chunk_size` query pixels against the
bank, never as one N x M matrix.

Hyperparameters, with their source:
- k = 8 and min_margin = 0.5 (ours): the paper's wording is the single best match, and its figure
  illustrates several matches. With k = 1 and no filter every pixel is used, right or wrong
  (coverage 1.00 and pseudo-label Dice 0.675 on synthetic at 5 %, against pseudo_label's 0.804 at
  93 %, docs/RESULTS.md). A margin of 0.5 keeps a pixel when its winning class holds at least 3/4
  of the similarity-weighted vote, about 6 of 8 neighbours: pixels whose neighbours disagree,
  mostly at boundaries, are left out, the role the 0.95 confidence threshold plays for
  pseudo_label. k = 1 with min_margin = 0 is the paper's single best match.
- similarity_threshold = 0.0 (ours): optional minimum cosine of the best match, in [-1, 1]. The
  decoder features follow a ReLU, so cosines are >= 0 and 0 removes nothing.
- feature_layer = "concat" (ours; the abstract does not say which layer is matched): matching on
  the last decoder map alone, the 16 channels the 1x1 head classifies, is barely independent of
  the prediction; the previous map adds wider, coarser context but alone loses boundary detail.
- bank_size = 2048 (ours): reference pixels in the bank, about bank_size / num_classes per class
  (matching cost grows linearly with it). bank_refresh = "queue" (ours): "epoch" rebuilds only at
  epoch starts.
- feature_ema = 0.99 (ours, not the paper's, which needs no "accompanying networks"): the matched
  features (bank and queries) come from an EMA copy of the model. Matching on the student's own
  features collapsed in our runs (synthetic, 5 % labels: pseudo-label Dice 0.50 -> 0.09 and val
  Dice 0.63 -> 0.12 over 15 epochs, as labels and features chased each other), while the EMA copy
  held pseudo-label Dice at about 0.67. Set 0 for the paper's variant. As for a mean teacher, the
  EMA is over parameters only and the copy's BatchNorm statistics are its own, from its own
  train-mode passes (see `ema_update`).
- unlabeled_weight = 1.0: weight of the pseudo-label cross-entropy (FixMatch's lambda_u, as
  pseudo_label).
- rampup_fraction = 0.25: sigmoid ramp-up of that weight over the first quarter of the run, since
  features of an untrained network match poorly at first. The paper gives no ramp-up that we could
  check; the length is Laine & Aila's (80 of 300 epochs), the ramp shape theirs.
- cutmix = True, cutmix_p = 0.5: CutMix of the strong views with the matched labels mixed alike
  (see `WeakToStrongSelfTraining`), as pseudo_label runs it (UniMatch's p = 0.5).
- chunk_size = 4096 (ours, a memory bound): query pixels per similarity matmul.

Measured (docs/RESULTS.md, "reference_guided (issue 12)"; synthetic, 5 %, one seed, 800 steps):
these defaults trail pseudo_label by 0.050 test Dice (95 % CI [-0.066, -0.034]), and k = 1 with
no filter by 0.043. Matched labels peak at 0.725 Dice and then drift down as the model trains on
them. Offline, on the same networks, matching on any of the three layers is at best level with
the 0.95-confidence argmax at similar coverage; the layer moves pseudo-label Dice by <= 0.01.

Deviations from the paper (as far as its abstract lets us check):
- the k-NN vote, margin filter and similarity threshold (the paper: the best-fitting pixel);
- the EMA matching network (feature_ema > 0);
- CutMix on the strong view, on by default so that the comparison with pseudo_label differs only
  in where labels come from (matching or prediction), which is the paper's claim; and the
  photometric weak-to-strong pair itself, which the paper's abstract does not describe;
- the bank is a class-balanced random sample of the labeled pixels, not all of them;
- the refresh passes (epoch start) run the matcher in train mode on batches of REFRESH_BATCH
  labeled images, as the query passes run it: BatchNorm normalises with batch statistics in both.
  With feature_ema = 0 the student's BatchNorm statistics and mode are restored after a refresh,
  so evaluation sees only those of training passes.

The student is what is evaluated (`evaluates = "student"`): the EMA copy only matches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import ConfigError, SemisegError
from semiseg.methods.base import Batch
from semiseg.methods.common import (WeakToStrongSelfTraining, check_decays, check_fractions,
                                    check_range, check_weights, ema_update, make_teacher, pixels,
                                    unwrap)
from semiseg.methods.registry import register_method

FEATURE_LAYERS = ("last", "previous", "concat")
BANK_REFRESH = ("epoch", "queue")
REFRESH_BATCH = 8
"""Labeled images per matcher pass when the bank is rebuilt (data.batch_size's default), so
BatchNorm's batch statistics come from batches of about the size the query passes have."""


@dataclass
class ReferenceGuidedConfig:
    k: int = 8
    """Nearest reference pixels that vote on each unlabeled pixel's label."""
    min_margin: float = 0.5
    """Minimum vote margin (winner - runner-up) / total weight for a pixel to be used, in [0, 1]."""
    similarity_threshold: float = 0.0
    """Minimum cosine similarity of the best match for a pixel to be used, in [-1, 1]."""
    feature_layer: str = "concat"
    """Matched features: "last" decoder map, the "previous" one upsampled, or their "concat"."""
    bank_size: int = 2048
    """Reference pixels in the bank: about bank_size // num_classes of each class."""
    bank_refresh: str = "queue"
    """"epoch": rebuild from every labeled image at each epoch start; "queue": also replace the
    labeled batch's own entries at every step."""
    unlabeled_weight: float = 1.0
    """Weight of the pseudo-label cross-entropy after ramp-up."""
    rampup_fraction: float = 0.25
    """Fraction of the run over which unlabeled_weight ramps up (sigmoid), in [0, 1]."""
    cutmix: bool = True
    """CutMix the strong views between unlabeled images, mixing the matched labels alike."""
    cutmix_p: float = 0.5
    """Probability that an unlabeled image gets a CutMix box, in [0, 1]."""
    chunk_size: int = 4096
    """Query pixels per similarity matmul (bounds memory at chunk_size x bank_size)."""
    feature_ema: float = 0.99
    """Features for matching come from an EMA copy of the model with this decay, in [0, 1);
    0 uses the student itself (which collapsed in our runs, see the module docstring)."""

    def __post_init__(self) -> None:
        for key in ("k", "bank_size", "chunk_size"):
            check_range(self, key, 1, integer=True)
        check_range(self, "similarity_threshold", -1, 1)
        check_weights(self, "unlabeled_weight")
        check_fractions(self, "min_margin", "rampup_fraction", "cutmix_p")
        check_decays(self, "feature_ema")
        for key, allowed in (("feature_layer", FEATURE_LAYERS), ("bank_refresh", BANK_REFRESH)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"method.params.{key}={getattr(self, key)!r}: expected one of "
                                  f"{', '.join(map(repr, allowed))}")


def layer_features(maps: list[Tensor], layer: str) -> Tensor:
    """(B, D, H, W) matching features from a U-Net's decoder maps (coarsest first), each part
    L2-normalised per pixel, so that the dot product of two pixels is a cosine; for "concat" it is
    the mean of the last and previous maps' cosines (the 1/sqrt(2) keeps the norm 1)."""
    last = F.normalize(maps[-1].float(), dim=1)
    if layer == "last":
        return last
    previous = F.interpolate(maps[-2].float(), size=last.shape[-2:], mode="bilinear",
                             align_corners=False)
    previous = F.normalize(previous, dim=1)  # after upsampling: interpolated vectors are shorter
    if layer == "previous":
        return previous
    return torch.cat([last, previous], dim=1) / math.sqrt(2.0)


def sample_image(features: Tensor, mask: Tensor, quota: Tensor) -> tuple[Tensor, Tensor]:
    """Up to quota[c] random pixels of each class c of one image, without replacement:
    ((m, D) features, (m,) labels) from (D, H, W) features and an (H, W) mask."""
    flat = mask.reshape(-1)
    feats = features.reshape(features.shape[0], -1).T
    keep = []
    for c in flat.unique().tolist():
        idx = (flat == c).nonzero(as_tuple=True)[0]
        keep.append(idx[torch.randperm(len(idx), device=idx.device)[:int(quota[c])]])
    keep_idx = torch.cat(keep)
    return feats[keep_idx], flat[keep_idx]


class ReferenceBank:
    """Reference pixels per labeled image (keyed by dataset index), class-balanced over images.

    `presence[i]` says which classes image i contains; from it, `quota()` gives how many pixels
    of each class one image contributes: ceil(per_class / n_c) for the n_c images containing c,
    at least 1, so the bank holds every class of every image and about `per_class` of each
    class in all. `add` replaces an image's entries, so the bank is a queue over images."""

    def __init__(self, num_classes: int, size: int) -> None:
        self.num_classes = num_classes
        self.per_class = max(1, size // num_classes)
        self.presence: dict[int, Tensor] = {}
        self.entries: dict[int, tuple[Tensor, Tensor]] = {}
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return sum(len(labels) for _, labels in self.entries.values())

    def know(self, masks: Tensor, index: Tensor) -> None:
        """Record which classes each image of (B, H, W) `masks` contains (unions over calls)."""
        counts = F.one_hot(masks.reshape(len(masks), -1), self.num_classes).sum(1).cpu() > 0
        for i, present in zip(index.tolist(), counts):
            self.presence[i] = present | self.presence.get(i, torch.zeros_like(present))

    def quota(self) -> Tensor:
        """(num_classes,) pixels per image and class."""
        images_with = torch.stack(list(self.presence.values())).sum(0).clamp(min=1)
        return torch.ceil(self.per_class / images_with).long()

    @torch.no_grad()
    def add(self, features: Tensor, masks: Tensor, index: Tensor) -> None:
        """Replace the entries of each image in the batch ((B, D, H, W) normalised features,
        (B, H, W) masks, (B,) dataset indices; an image drawn twice is taken once)."""
        self.know(masks, index)
        quota = self.quota()
        seen: set[int] = set()
        for j, i in enumerate(index.tolist()):
            if i not in seen:
                seen.add(i)
                self.entries[i] = sample_image(features[j].detach().float(), masks[j], quota)
        self._cache = None

    def clear(self) -> None:
        """Drop every entry (the classes each image contains stay known)."""
        self.entries.clear()
        self._cache = None

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(M, D) features, (M,) labels and (M,) owning dataset index, in index order."""
        if self._cache is None:
            order = sorted(self.entries)
            feats, labels = zip(*(self.entries[i] for i in order))
            owners = torch.cat([torch.full((len(lab),), i, dtype=torch.long)
                                for i, lab in zip(order, labels)])
            self._cache = torch.cat(feats), torch.cat(labels), owners
        return self._cache


class Matches(NamedTuple):
    labels: Tensor
    """(N,) the similarity-weighted vote of the k nearest reference pixels."""
    best: Tensor
    """(N,) cosine similarity of the single nearest reference pixel."""
    margin: Tensor
    """(N,) (winner's weight - runner-up's) / total weight, in [0, 1]; 1 when k = 1."""


@torch.no_grad()
def match_labels(query: Tensor, bank: Tensor, bank_labels: Tensor, k: int, num_classes: int,
                 chunk_size: int) -> Matches:
    """For each (N, C) normalised query feature: the similarity-weighted vote of its k most
    similar bank features, the similarity of its best match, and the vote's margin. Chunked
    over queries, so no intermediate exceeds chunk_size x M."""
    k = min(k, len(bank))
    labels, best, margin = [], [], []
    for start in range(0, len(query), chunk_size):
        sims = query[start:start + chunk_size] @ bank.T           # (chunk, M) only
        if k == 1:  # max is much cheaper than topk
            top_sim, top_idx = (t[:, None] for t in sims.max(dim=1))
        else:
            top_sim, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], top_sim.float().clamp(min=0) + 1e-6)  # bf16 under AMP
        top2 = votes.topk(min(2, num_classes), dim=1).values
        runner_up = top2[:, 1] if num_classes > 1 else torch.zeros_like(top2[:, 0])
        labels.append(votes.argmax(1))
        best.append(top_sim[:, 0])
        margin.append((top2[:, 0] - runner_up) / votes.sum(1))
    return Matches(torch.cat(labels), torch.cat(best), torch.cat(margin))


@register_method(__name__)
class ReferenceGuided(WeakToStrongSelfTraining):
    """Unlabeled pixels take the k-NN vote of labeled reference pixels in a persistent bank."""

    Config = ReferenceGuidedConfig

    def __init__(self, model: nn.Module, cfg: ReferenceGuidedConfig, num_classes: int,
                 total_steps: int = 1000) -> None:
        super().__init__(model, cfg, num_classes, total_steps)
        stages = len(getattr(unwrap(model), "decoders", ()))
        if cfg.feature_layer != "last" and stages < 2:
            raise ConfigError(f"method.params.feature_layer={cfg.feature_layer!r} needs a model "
                              f"with at least 2 decoder stages (model.depth >= 2), got {stages}")
        self.matcher = make_teacher(model) if cfg.feature_ema > 0 else None
        self.bank = ReferenceBank(num_classes, cfg.bank_size)
        self.labeled_set: tuple[Tensor, Tensor, Tensor] | None = None

    # ---- the bank -----------------------------------------------------------------------
    def set_labeled_set(self, images: Tensor, masks: Tensor, index: Tensor) -> None:
        self.labeled_set = (images, masks, index)
        self.bank.know(masks, index)

    def on_epoch_start(self, epoch: int) -> None:
        if self.labeled_set is not None:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the bank from every labeled image with the current matching network."""
        images, masks, index = self.labeled_set
        self.bank.clear()
        with self._student_kept():
            for start in range(0, len(index), REFRESH_BATCH):
                part = slice(start, start + REFRESH_BATCH)
                self.bank.add(self._features(images[part]), masks[part], index[part])

    @contextlib.contextmanager
    def _student_kept(self) -> Iterator[None]:
        """With feature_ema = 0 the student itself matches: run it in train mode, as the query
        passes do, and give it back its mode and BatchNorm statistics after."""
        if self.matcher is not None:
            yield
            return
        net = unwrap(self.model)
        mode, saved = net.training, {n: b.clone() for n, b in net.named_buffers()}
        net.train()
        try:
            yield
        finally:
            net.train(mode)
            for n, b in net.named_buffers():
                b.copy_(saved[n])

    def _features(self, images: Tensor) -> Tensor:
        """Normalised matching features of `images` from the matcher (train mode: batch
        statistics, which also update the EMA copy's own), without gradient."""
        net = self.matcher if self.matcher is not None else unwrap(self.model)
        if self.matcher is not None:
            self.matcher.train()
        with torch.no_grad():
            _, maps = net(images, return_decoder_maps=True)
        return layer_features(maps, self.cfg.feature_layer)

    def observe_labeled(self, labeled: Batch, features: Tensor) -> None:
        if self.cfg.bank_refresh == "epoch" and self.labeled_set is not None:
            return  # without a labeled set (a bare method), the batches are all it has: a queue
        if self.matcher is None and self.cfg.feature_layer == "last":
            feats = F.normalize(features.detach().float(), dim=1)  # the labeled pass's own
        else:
            feats = self._features(labeled.image)
        self.bank.add(feats, labeled.mask, labeled.index)

    # ---- pseudo-labels ------------------------------------------------------------------
    def pseudo_labels(self, unlabeled: Batch) -> tuple[Tensor, Tensor]:
        if not len(self.bank):
            if self.labeled_set is None:
                raise SemisegError("reference_guided: the reference bank is empty; run a "
                                   "training_step with a labeled batch, or set_labeled_set, first")
            self.refresh()
        bank, bank_labels, _ = self.bank.tensors()
        feats = self._features(unlabeled.image)
        b, _, h, w = feats.shape
        m = match_labels(pixels(feats), bank, bank_labels, self.cfg.k, self.num_classes,
                         self.cfg.chunk_size)
        used = (m.best >= self.cfg.similarity_threshold) & (m.margin >= self.cfg.min_margin)
        return m.labels.view(b, h, w), used.view(b, h, w)

    def after_optimizer_step(self, step: int) -> None:
        if self.matcher is not None:
            ema_update(self.matcher, self.model, self.cfg.feature_ema, step)

    def state_dict(self) -> dict[str, Any]:
        # The bank is not saved: every epoch start rebuilds it, and checkpoints are per epoch.
        return {"matcher": None if self.matcher is None else self.matcher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.matcher is not None:
            self.matcher.load_state_dict(state["matcher"])
