"""The pixel-to-class-mean local contrastive loss of Chaitanya et al. (arXiv 2112.09645), as the
official code computes it (krishnabits001/pseudo_label_contrastive_training, `models.py`
`joint_tr_unet_seg_loss_and_local_cont_loss`, `local_loss_exp_no=1`, the "inter-image" variant
it runs by default). Pure torch, vectorised over pairs, classes and anchors.

The loss works on pairs of images (x, x'): two intensity views of one image, or two different
images. For each class c in both, a few anchor pixels z of class c are drawn from each image;
each anchor is pulled to the mean embedding of c in its own image and to the mean of c in the
other image, against the means of every class present in both images:

    l(z) = -log(e^{s(z, mu_c)} / D) - log(e^{s(z, mu'_c)} / D),
    D = sum_k e^{s(z, mu_k)} + sum_k e^{s(z, mu'_k)},   s(a, b) = cos(a, b) / temperature,

with mu the class means of the anchor's image and mu' those of the other one. The loss is the
mean of l over all anchors of both images of every pair; the official code sums the same terms
and divides by 2 x positives x classes per pair, then by the pairs, which is this mean when
every class is present (it only admits images that contain every class).

Labels are per pixel, -1 for "no label" (such pixels are neither anchors nor in any mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_means(z: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
    """(P, K, C) unit-length mean embeddings of each class in each image and (P, K) pixel counts,
    from (P, C, N) embeddings and a (P, K, N) class mask. The official code averages the raw
    embeddings, then normalises the mean inside the cosine."""
    counts = onehot.sum(-1)
    sums = torch.einsum("pkn,pcn->pkc", onehot.to(z.dtype), z)
    return F.normalize(sums / counts.clamp(min=1)[..., None], dim=-1), counts


def sample_anchors(onehot: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
    """(P, K, S) flat pixel indices of up to `per_class` distinct random pixels of each class
    per image (S = min(per_class, N)), and a (P, K, S) mask of the draws that hit the class (a
    class with fewer pixels fills the rest with misses). Draws from torch's global RNG."""
    scores = torch.rand(onehot.shape, device=onehot.device).masked_fill(~onehot, -1.0)
    top, index = scores.topk(min(per_class, onehot.shape[-1]), dim=-1)
    return index, top >= 0


def _anchor_terms(z: Tensor, onehot: Tensor, mean_own: Tensor, mean_other: Tensor,
                  present: Tensor, per_class: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Sum of l over the valid anchors of one side of every pair, and their count."""
    p, c, n = z.shape
    index, hit = sample_anchors(onehot, per_class)
    flat = (index + n * torch.arange(p, device=z.device)[:, None, None]).reshape(-1)
    anchors = F.normalize(z.permute(0, 2, 1).reshape(p * n, c)[flat], dim=-1)
    anchors = anchors.reshape(*index.shape, c)                              # (P, K, S, C)
    own = torch.einsum("pksc,pjc->pksj", anchors, mean_own) / temperature   # (P, K, S, K)
    other = torch.einsum("pksc,pjc->pksj", anchors, mean_other) / temperature
    absent = ~present[:, None, None, :]
    log_d = torch.logsumexp(torch.cat([own.masked_fill(absent, float("-inf")),
                                       other.masked_fill(absent, float("-inf"))], -1), -1)
    k = torch.arange(own.shape[1], device=z.device)
    pos_own, pos_other = own[:, k, :, k], other[:, k, :, k]                 # (K, P, S)
    terms = (2 * log_d - pos_own.permute(1, 0, 2) - pos_other.permute(1, 0, 2))
    valid = hit & present[..., None]
    return terms.masked_fill(~valid, 0.0).sum(), valid.sum()


def local_contrastive_loss(z1: Tensor, y1: Tensor, z2: Tensor, y2: Tensor, classes: Tensor,
                           temperature: float, per_class: int, min_pixels: int) -> tuple[Tensor, int]:
    """Mean of l over anchors of the pairs (z1[i], z2[i]) and their count.

    z1, z2: (P, C, H, W) embeddings; y1, y2: (P, H, W) labels, -1 unlabeled; `classes`: the
    label values contrasted (the official code: the foreground classes). A class enters a pair
    (as anchors, and as a mean in D) only where each image has at least `min_pixels` of it.
    With no such class anywhere the loss is a zero that keeps the graph (gradient 0)."""
    p, c = z1.shape[:2]
    z1, z2 = z1.float().reshape(p, c, -1), z2.float().reshape(p, c, -1)
    hot1 = y1.reshape(p, 1, -1) == classes.view(1, -1, 1)
    hot2 = y2.reshape(p, 1, -1) == classes.view(1, -1, 1)
    mean1, count1 = class_means(z1, hot1)
    mean2, count2 = class_means(z2, hot2)
    present = (count1 >= min_pixels) & (count2 >= min_pixels)               # (P, K)
    total1, n1 = _anchor_terms(z1, hot1, mean1, mean2, present, per_class, temperature)
    total2, n2 = _anchor_terms(z2, hot2, mean2, mean1, present, per_class, temperature)
    count = int(n1 + n2)
    if count == 0:
        return (z1.sum() + z2.sum()) * 0.0, 0
    return (total1 + total2) / count, count
