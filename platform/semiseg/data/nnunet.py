"""The `nnunet` dataset: an nnU-Net v2 raw dataset, or a Medical Segmentation Decathlon task, cut
into 2D slices.

    data.root/            one dataset folder (Dataset004_Hippocampus/, Task04_Hippocampus/)
      dataset.json        channel_names, labels (name -> int), file_ending; or the MSD keys
      imagesTr/           CASE_0000.nii.gz, CASE_0001.nii.gz, ... (MSD: CASE.nii.gz, 4D)
      labelsTr/           CASE.nii.gz
      imagesTs/           optional, ignored (no labels)

Which files are read, and how dataset.json is checked: `semiseg.data.nnunet_layout`.
Reference: Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical
image segmentation", Nature Methods 18 (2021); code MIC-DKFZ/nnUNet (nnunetv2).

- Channels: a case's files (`_0000`, `_0001`, ..., or the last axis of an MSD 4D file) become
  the input channels of each slice: images are (N, C, H, W) for C > 1 and (N, H, W) for one
  channel, as every other dataset. The model's in_channels follows (SegData.in_channels).
- Slice axis: nnU-Net's 2D configuration convolves over the two axes of finest spacing (its
  planner moves the axis of largest median spacing first, ExperimentPlanner.determine_transpose).
  So do we: slices are cut across the axis with the largest median voxel spacing over the
  dataset's cases (a tie goes to the last axis, as in the nifti dataset), so an MRI of
  0.6 x 0.6 x 3 mm is cut into its high-resolution planes whichever axis stores them.
- In-plane: each case's field of view is resampled to square pixels, its longer physical side
  (voxels x mm) to image_size pixels, the shorter side in proportion, then padded to a square
  (each channel with its slice's minimum, the label with background). The resulting spacing,
  (t, t, slice spacing) mm, is recorded per case in SegData.volumes.
- Each case is a group (a split never cuts one), and a label budget counts cases by default
  (`data.label_unit: auto` is `case` here).
- Checks, as nnU-Net's verify_dataset_integrity: every channel and the label of a case share
  one voxel grid (shape and affine); labels are integers that dataset.json declares;
  intensities are finite.

Deviations from nnU-Net:
- slices are resized to one square size (data.image_size) instead of resampled to the median
  spacing, so pixel spacing differs between cases (each case's is recorded);
- no crop to the non-zero region; orientation is the files' voxel order (no reorientation);
- by default every channel of every slice is z-scored (data.normalize=image), as every semiseg
  dataset, where nnU-Net z-scores per case; data.normalize=ct is nnU-Net's CTNormalization
  over the training split's foreground.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semiseg.data.base import DATASETS, SegData, SliceOrigin, check_classes_present
from semiseg.data.nifti import check_finite, read_nifti, spacing_of, voxel_spacing
from semiseg.data.nnunet_layout import Case, Layout, read_layout
from semiseg.data_config import DataConfig
from semiseg.errors import DatasetError

Spacing = tuple[float, float, float]
# Affines of the channels and label of one case must agree to this (mm; unitless for the
# rotation part): float32 headers written from one grid differ far less.
AFFINE_TOLERANCE = 1e-3


def _volume(path: Path) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """(voxels, affine, spacing) of one NIfTI file; a trailing axis of length 1 is dropped."""
    data, image = read_nifti(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3 or 0 in data.shape:
        raise DatasetError(f"{path}: volume has shape {data.shape}; expected a non-empty 3D "
                           "volume (X, Y, Z)")
    return data, np.asarray(image.affine, dtype=np.float64), spacing_of(image)


def _same_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray, ref: Path,
               ref_shape: tuple[int, ...], ref_affine: np.ndarray, what: str) -> None:
    if shape != ref_shape:
        raise DatasetError(f"{path}: {what} shape {shape} differs from {ref} shape {ref_shape}; "
                           "expected every channel and the label of a case on one voxel grid")
    gap = float(np.abs(affine - ref_affine).max())
    if gap > AFFINE_TOLERANCE:
        raise DatasetError(f"{path}: {what} affine differs from {ref} (by up to {gap:.3g}); "
                           "expected every channel and the label of a case on one voxel grid "
                           "(same spacing, origin and direction)")


def _read_image(case: Case, layout: Layout) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """(C, X, Y, Z) intensities, the affine and the spacing of a case's channels."""
    count = len(layout.channels)
    first, affine, spacing = _volume(case.images[0])
    if len(case.images) == 1:  # MSD: every modality on the 4th axis of one file
        if first.ndim == 3 and count == 1:
            first = first[..., None]
        if first.ndim != 4 or first.shape[-1] != count:
            raise DatasetError(f"{case.images[0]}: volume has shape {first.shape}; expected "
                               f"(X, Y, Z, {count}) for the {count} modalities of {layout.spec}")
        return check_finite(case.images[0], np.moveaxis(first, -1, 0)), affine, spacing
    if first.ndim != 3:
        raise DatasetError(f"{case.images[0]}: volume has shape {first.shape}; expected a 3D "
                           "volume (X, Y, Z) per channel file")
    channels = [first]
    for path in case.images[1:]:
        data, other, _ = _volume(path)
        _same_grid(path, data.shape, other, case.images[0], first.shape, affine, "channel")
        channels.append(data)
    for path, data in zip(case.images, channels):
        check_finite(path, data)
    return np.stack(channels), affine, spacing


def _read_label(case: Case, layout: Layout, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    data, own, _ = _volume(case.label)
    _same_grid(case.label, data.shape, own, case.images[0], shape, affine, "label")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise DatasetError(f"{case.label}: label volume has non-integer values; expected class "
                           "indices")
    values = np.unique(rounded).astype(np.int64)
    bad = values[(values < 0) | (values >= len(layout.classes))]
    if bad.size:
        declared = ", ".join(f"{v} {name}" for v, name in enumerate(layout.classes))
        raise DatasetError(f"{case.label}: label values {bad.tolist()[:10]} are not in the labels "
                           f"of {layout.spec} ({declared})")
    return rounded.astype(np.int64)


def slice_axis(spacings: list[Spacing]) -> int:
    """The axis of largest median spacing; ties go to the last of them."""
    median = np.median(np.asarray(spacings, dtype=np.float64), axis=0)
    return int(2 - np.argmax(median[::-1]))


def _resample(image: np.ndarray, labels: np.ndarray, plane: tuple[float, float],
              size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(Z, C, R, W) slices and (Z, R, W) labels to square pixels of one field of view, padded to
    size x size; returns them and the new pixel spacing (mm)."""
    rows, cols = image.shape[-2:]
    pixel = max(rows * plane[0], cols * plane[1]) / size
    h = int(np.clip(round(rows * plane[0] / pixel), 1, size))
    w = int(np.clip(round(cols * plane[1] / pixel), 1, size))
    x, y = torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(labels[:, None].astype(np.float32))
    if (h, w) != (rows, cols):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=(h, w), mode="nearest")  # labels stay labels
    top, left = (size - h) // 2, (size - w) // 2
    out = np.empty((*image.shape[:2], size, size), np.float32)
    out[:] = x.amin(dim=(2, 3)).numpy()[..., None, None]  # pad each channel with its minimum
    out[:, :, top:top + h, left:left + w] = x.numpy()
    masks = np.zeros((len(labels), size, size), np.int64)
    masks[:, top:top + h, left:left + w] = y[:, 0].numpy().astype(np.int64)
    return out, masks, pixel


def _finish(image: np.ndarray) -> np.ndarray:
    """(C, H, W) raw intensities as float32: `load_dataset` normalises them by data.normalize
    (per image and channel by default; `ct` needs the raw Hounsfield units)."""
    return image.astype(np.float32, copy=False)


def _case_slices(case: Case, layout: Layout, axis: int, size: int
                 ) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """(Z, C, size, size) images, (Z, size, size) masks and their spacing for one case."""
    image, affine, spacing = _read_image(case, layout)
    labels = _read_label(case, layout, image.shape[1:], affine)
    plane = tuple(spacing[a] for a in range(3) if a != axis)
    slices, masks, pixel = _resample(np.moveaxis(image, axis + 1, 0), np.moveaxis(labels, axis, 0),
                                     plane, size)  # type: ignore[arg-type]
    return np.stack([_finish(s) for s in slices]), masks, (pixel, pixel, spacing[axis])


@DATASETS.register("nnunet")
def build(cfg: DataConfig) -> SegData:
    """Every training case under cfg.root, cut across its coarsest axis, resized, one group each."""
    if not cfg.root:
        raise DatasetError("data.root is empty: the nnunet dataset needs an nnU-Net raw dataset "
                           "folder (dataset.json, imagesTr/, labelsTr/)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DatasetError(f"data.root {root} is not a directory (expected dataset.json, "
                           "imagesTr/, labelsTr/)")
    layout = read_layout(root)
    axis = slice_axis([voxel_spacing(case.images[0]) for case in layout.cases])
    images, masks, ids, volume, z_index = [], [], [], [], []
    spacing: dict[str, Spacing] = {}
    for case in layout.cases:
        case_images, case_masks, spacing[case.id] = _case_slices(case, layout, axis, cfg.image_size)
        images.append(case_images)
        masks.append(case_masks)
        depth = len(case_masks)
        ids += [f"{case.id}_z{z:03d}" for z in range(depth)]
        volume += [case.id] * depth
        z_index += list(range(depth))
    stacked, labels = np.concatenate(images), np.concatenate(masks)
    check_classes_present(labels, layout.classes, root, layout.spec)
    return SegData(stacked[:, 0] if stacked.shape[1] == 1 else stacked, labels, list(volume), ids,
                   list(layout.classes), "nnunet", volumes=SliceOrigin(volume, z_index, spacing),
                   channel_names=list(layout.channels), label_unit="case")
