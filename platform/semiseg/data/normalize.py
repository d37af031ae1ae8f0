"""Intensity normalisation of a loaded dataset (`data.normalize`), after its images are resized.

Dataset builders return raw intensities (after the resize to data.image_size); `load_dataset`
hands the result here, so every caller (trials, the pseudo-label actors, benchmarks, a cache of
the prepared dataset) sees one normalisation. The modes follow nnU-Net's schemes (Isensee et
al., Nature Methods 2021; MIC-DKFZ/nnUNet, nnunetv2/preprocessing/normalization/
default_normalization_schemes.py, and the statistics from
nnunetv2/experiment_planning/dataset_fingerprint/fingerprint_extractor.py):

- `image` (the default, semiseg's behaviour before this option): each 2D image, each channel,
  to zero mean and unit variance (`base.normalise`; a constant image becomes zeros).
- `dataset`: one z-score for the whole dataset, with the mean and standard deviation of every
  pixel of the training images (per channel).
- `ct`: nnU-Net's CTNormalization. From the foreground pixels (mask > 0) of the training
  images: the 0.5 and 99.5 percentiles (np.percentile, linear), the mean and the standard
  deviation. Every image is clipped to the percentiles, then z-scored with that mean and std
  (`max(std, 1e-8)`). As in nnU-Net, the mean and std are those of the unclipped foreground
  intensities (the fingerprint's `mean` / `std`), so a clipped image is not exactly zero-mean.
  Hounsfield units mean the same tissue in every scan, so one window for all cases is right,
  where a per-image z-score would map air and bone differently in each slice.

Statistics come from the training split only: labeled + unlabeled, never val or test. That
set depends only on (dataset, data.split_seed, data.val_fraction, data.test_fraction), not on
the label fraction, the label unit, the method or train.seed (`semiseg.data.splits`: val and
test are drawn first, by group), so every run of a sweep trains and is tested on the same
inputs, and the normalised dataset is a function of the data config alone, which is what a
cache keyed by the data-config hash needs. `data.normalize` is part of a run's identity (its
default, `image`, is left out, so configs written before the option keep their hash).

Deviations from nnU-Net:
- statistics and normalisation act on the resized 2D slices the network sees, not on the
  native voxel grid before resampling (nnU-Net crops, normalises, then resamples);
- every foreground pixel of every training image counts, not 10 000 voxels sampled per case
  with replacement (seed 1234): exact and deterministic, but a case weighs by its foreground
  size rather than equally;
- `ct` reads the masks of the unlabeled training cases too (nnU-Net has no unlabeled cases).
  Four numbers per channel come from them, never a pixel's label; restricting them to the
  labeled cases would make the inputs depend on the label fraction and train.seed;
- one mode for every channel (nnU-Net picks per channel from `channel_names`); statistics are
  per channel;
- `image` is per 2D slice, not per 3D case (nnU-Net's ZScoreNormalization is per case): the
  behaviour every earlier run used, kept as the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semiseg.data.base import SegData, normalise
from semiseg.data.splits import make_split
from semiseg.data_config import DataConfig
from semiseg.errors import DatasetError

MODES = ("image", "dataset", "ct")
CT_PERCENTILES = (0.5, 99.5)  # nnU-Net's percentile_00_5 / percentile_99_5
_MIN_STD = 1e-8  # nnU-Net's max(std, 1e-8)


@dataclass(frozen=True)
class IntensityStats:
    """Per channel: the z-score's mean and std and, for `ct`, the clip window."""

    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    lower: tuple[float, ...] | None = None
    upper: tuple[float, ...] | None = None


def training_indices(data: SegData, cfg: DataConfig) -> list[int]:
    """The images of the training split (labeled + unlabeled), the only ones statistics may see.
    labeled + unlabeled is the same set for every seed and label budget, so seed 0 stands in."""
    split = make_split(data, cfg, seed=0)
    return sorted(split.labeled + split.unlabeled)


def _channels(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) view of (N, H, W) or (N, C, H, W) images."""
    return images[:, None] if images.ndim == 3 else images


def intensity_stats(data: SegData, train: list[int], mode: str) -> IntensityStats:
    """The statistics `mode` normalises with, from the images at `train` only."""
    if mode not in ("dataset", "ct"):
        raise ValueError(f"intensity_stats: mode {mode!r} has no dataset statistics")
    idx = np.asarray(train, dtype=np.int64)
    images = _channels(data.images)[idx]
    where = f"{data.source} dataset: data.normalize={mode}"
    if mode == "dataset":
        values = [images[:, c].ravel() for c in range(images.shape[1])]
    else:
        foreground = data.masks[idx] > 0
        if not foreground.any():
            raise DatasetError(
                f"{where} takes its clip window and z-score from foreground (mask > 0) pixels of "
                f"the {len(idx)} training image(s), and none has any; expected labelled "
                "foreground in the training cases (or use data.normalize=dataset or image)")
        values = [images[:, c][foreground] for c in range(images.shape[1])]
    mean = tuple(float(v.mean(dtype=np.float64)) for v in values)
    std = tuple(float(v.std(dtype=np.float64)) for v in values)
    flat = [c for c, s in enumerate(std) if s <= _MIN_STD]
    if mode == "dataset" and flat:
        raise DatasetError(f"{where}: channel {flat[0]} of the training images is constant "
                           f"({mean[flat[0]]:g}); a z-score needs varying intensities")
    if mode == "dataset":
        return IntensityStats(mode, mean, std)
    bounds = [np.percentile(v.astype(np.float64), CT_PERCENTILES) for v in values]
    return IntensityStats(mode, mean, std, tuple(float(b[0]) for b in bounds),
                          tuple(float(b[1]) for b in bounds))


def apply_stats(images: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """Images normalised with `stats` (clip first for ct), as a new float32 array."""
    out = _channels(images).astype(np.float32)  # a copy: the loader's array is left alone
    for c in range(out.shape[1]):
        channel = out[:, c]
        if stats.lower is not None and stats.upper is not None:
            np.clip(channel, stats.lower[c], stats.upper[c], out=channel)
        channel -= stats.mean[c]
        channel /= max(stats.std[c], _MIN_STD)
    return out[:, 0] if images.ndim == 3 else out


def per_image(images: np.ndarray) -> np.ndarray:
    """`image` mode: each image (each channel of it) z-scored on its own, as float32."""
    out = np.empty(images.shape, dtype=np.float32)
    src, dst = _channels(images), _channels(out)
    for i in range(len(src)):
        for c in range(src.shape[1]):
            dst[i, c] = normalise(src[i, c])
    return out


def _check_raw(data: SegData, mode: str) -> None:
    """Refuse a builder that z-scored its images itself: dataset statistics of per-image
    z-scores are meaningless (a CT window of z-scores clips nothing a radiologist would)."""
    images = _channels(data.images).reshape(len(data.images), -1).astype(np.float64)
    if len(images) > 1 and np.allclose(images.mean(1), 0, atol=1e-4) and np.allclose(
            images.std(1), 1, atol=1e-3):
        raise DatasetError(f"{data.source} dataset: its builder returned per-image normalised "
                           f"images, but data.normalize={mode} needs raw intensities; a dataset "
                           "builder must leave normalisation to load_dataset")


def normalize_dataset(data: SegData, cfg: DataConfig) -> SegData:
    """`data` with its images normalised by cfg.normalize (see the module docstring); the
    statistics used are kept in `data.intensity` (None for `image`)."""
    mode = getattr(cfg, "normalize", "image")
    if mode not in MODES:  # the config schema refuses it first; a hand-built DataConfig may not
        raise DatasetError(f"data.normalize={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "image":
        data.images, data.intensity = per_image(data.images), None
        return data
    _check_raw(data, mode)
    stats = intensity_stats(data, training_indices(data, cfg), mode)
    data.images, data.intensity = apply_stats(data.images, stats), stats
    return data
