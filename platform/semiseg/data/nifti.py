"""NIfTI volumes in the ACDC layout, cut into 2D slices along the last axis.

    root/
      dataset.yaml                      optional: classes: [...]  (default: the ACDC classes)
      patient001/
        patient001_frame01.nii.gz       an image volume
        patient001_frame01_gt.nii.gz    its label volume (same shape)
        patient001_4d.nii.gz, Info.cfg  ignored

Each patient is one group, so a split never puts slices of one patient on both sides, and a
label budget counts patients by default (`data.label_unit: auto` is `case` here). Each frame is
one volume (SegData.volumes), with its voxel spacing from the header scaled by the resize.
Non-square slices are padded to a square (background) before the resize, keeping their aspect.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from semiseg.data_config import DataConfig
from semiseg.data.base import DATASETS, SegData, SliceOrigin, check_classes_present
from semiseg.data.folder import read_spec
from semiseg.data.resize import pad_square, resize_pair
from semiseg.errors import DatasetError

ACDC_CLASSES = ["background", "right_ventricle", "myocardium", "left_ventricle"]
_FRAME = re.compile(r"^(?P<patient>.+)_frame(?P<frame>\d+)\.nii(\.gz)?$")


# Deflate cannot compress better than about 1032:1, so a .nii.gz of n bytes holds at most
# this many times n bytes of voxels.
_MAX_DEFLATE_RATIO = 1032


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    return DatasetError(
        f"{path}: cannot read the NIfTI volume ({type(exc).__name__}: {str(exc)[:200]}); "
        "is the file truncated or corrupt?"
    )


def _check_declared_size(path: Path, image: nib.spatialimages.SpatialImage) -> None:
    """Refuse a header that declares more voxel bytes than the file can hold, before reading:
    nibabel allocates the declared size first, so a corrupt dim field would otherwise ask
    for gigabytes of memory instead of failing."""
    declared = int(np.prod(image.shape, dtype=np.float64)) * image.get_data_dtype().itemsize
    ratio = _MAX_DEFLATE_RATIO if path.name.endswith(".gz") else 1
    available = path.stat().st_size * ratio
    if declared > available:
        raise DatasetError(
            f"{path}: the header declares a {image.shape} volume of {declared} bytes but the "
            f"file can hold at most {available}; is the file truncated or its header corrupt?"
        )


def _load_header(path: Path) -> nib.spatialimages.SpatialImage:
    """The NIfTI image object (header read, voxels not yet); a failure names the file."""
    try:
        return nib.load(str(path))
    except Exception as exc:  # not a NIfTI header, a truncated gzip, ...
        raise _unreadable(path, exc) from None


def spacing_of(image: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """The first three voxel sizes (mm) of a header; 1.0 where a size is missing, 0 or not
    finite (a header that leaves pixdim unset)."""
    try:
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
    except Exception:  # a damaged header: the voxels were readable, so assume unit spacing
        zooms = []
    zooms += [1.0] * (3 - len(zooms))
    return tuple(z if np.isfinite(z) and z > 0 else 1.0 for z in zooms)  # type: ignore[return-value]


def voxel_spacing(path: Path) -> tuple[float, float, float]:
    """spacing_of the NIfTI file at `path`."""
    return spacing_of(_load_header(path))


def read_nifti(path: Path) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """(voxels as float32 with as many axes as stored, the image for its affine and header);
    a header declaring more bytes than the file holds, or any nibabel / gzip failure, names
    the file."""
    image = _load_header(path)
    _check_declared_size(path, image)
    try:
        return np.asarray(image.dataobj, dtype=np.float32), image
    except Exception as exc:  # truncated data -> EOFError, zlib.error, nibabel errors, ...
        raise _unreadable(path, exc) from None


def _read_volume(path: Path) -> np.ndarray:
    """The volume as a 3D float array; any nibabel / gzip failure names the file."""
    data = read_nifti(path)[0]
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) is still a 3D volume
        data = data[..., 0]
    if data.ndim != 3 or 0 in data.shape:
        raise DatasetError(
            f"{path}: volume has shape {data.shape}; expected a non-empty 3D volume (X, Y, Z)"
        )
    return data


def check_finite(path: Path, volume: np.ndarray) -> np.ndarray:
    # NaN or Inf voxels would make every normalised slice NaN, and the run would only fail
    # at its first training step (as a diverged loss) instead of naming the file.
    bad = int(np.count_nonzero(~np.isfinite(volume)))
    if bad:
        raise DatasetError(f"{path}: {bad} voxel(s) are NaN or infinite; expected finite intensities")
    return volume


def _read_image_volume(path: Path) -> np.ndarray:
    return check_finite(path, _read_volume(path))


def _read_labels(
    path: Path, shape: tuple[int, ...], image_path: Path, classes: list[str]
) -> np.ndarray:
    labels = _read_volume(path)
    if labels.shape != shape:
        raise DatasetError(
            f"{path}: label shape {labels.shape} differs from image {image_path} shape {shape}"
        )
    rounded = np.rint(labels)
    if not np.array_equal(rounded, labels):
        raise DatasetError(f"{path}: label volume has non-integer values; expected class indices")
    bad = np.unique(rounded[(rounded < 0) | (rounded >= len(classes))])
    if bad.size:
        raise DatasetError(
            f"{path}: label values {bad.astype(np.int64).tolist()[:10]} are outside the class map "
            f"0..{len(classes) - 1} ({', '.join(classes)})"
        )
    return rounded.astype(np.int64)


def _frames(root: Path) -> list[tuple[str, str, Path]]:
    """(patient, frame number, image file) for every frame volume under root, sorted; refuses
    two files for one frame (frame01.nii beside frame01.nii.gz, or frame1 beside frame01)."""
    found: dict[tuple[str, int], tuple[str, str, Path]] = {}
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(patient_dir.iterdir()):
            m = _FRAME.match(f.name)
            if not (m and f.is_file()):
                continue
            key = (patient_dir.name, int(m["frame"]))
            if key in found:
                raise DatasetError(
                    f"{patient_dir}: {found[key][2].name} and {f.name} are the same frame; "
                    "expected one image volume per frame"
                )
            found[key] = (patient_dir.name, m["frame"], f)
    return list(found.values())  # folder, then file name order, as listed


def _gt_path(image_path: Path) -> Path:
    name = image_path.name
    stem, ext = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else (name[:-4], ".nii")
    return image_path.with_name(f"{stem}_gt{ext}")


@DATASETS.register("nifti")
def build(cfg: DataConfig) -> SegData:
    """All frames of all patients under cfg.root, sliced along the last axis and resized."""
    if not cfg.root:
        raise DatasetError(
            "data.root is empty: the nifti dataset needs a folder of patient folders"
        )
    root = Path(cfg.root)
    if not root.is_dir():
        raise DatasetError(f"data.root {root} is not a directory (expected patientXXX/ folders)")
    spec = root / "dataset.yaml"
    classes = read_spec(spec)[0] if spec.exists() else list(ACDC_CLASSES)
    frames = _frames(root)
    if not frames:
        raise DatasetError(
            f"no patients found in {root}: expected {root}/patientXXX/patientXXX_frameYY.nii.gz "
            "with a label volume patientXXX_frameYY_gt.nii.gz beside it"
        )
    images, masks, groups, ids, z_index = [], [], [], [], []
    sources: list[tuple[Path, int]] = []  # (image volume, z) per image, for SegData.native
    spacing: dict[str, tuple[float, float, float]] = {}
    for patient, frame, image_path in frames:
        gt_path = _gt_path(image_path)
        if not gt_path.is_file():
            raise DatasetError(f"{image_path}: missing its label volume {gt_path}")
        volume = _read_image_volume(image_path)
        labels = _read_labels(gt_path, volume.shape, image_path, classes)
        sx, sy, sz = voxel_spacing(image_path)
        scale = max(volume.shape[:2]) / cfg.image_size  # pad to the longer side, then resize
        spacing[f"{patient}_frame{frame}"] = (sx * scale, sy * scale, sz)
        for z in range(volume.shape[-1]):
            image = pad_square(volume[..., z], float(volume[..., z].min()))
            image, mask = resize_pair(image, pad_square(labels[..., z], 0), cfg.image_size)
            images.append(image)  # raw: load_dataset normalises (data.normalize)
            masks.append(mask)
            groups.append(patient)
            ids.append(f"{patient}_frame{frame}_z{z:02d}")
            z_index.append(z)
            sources.append((image_path, z))
    check_classes_present(np.stack(masks), classes, root, spec if spec.exists() else None)
    volumes = SliceOrigin([i.rsplit("_z", 1)[0] for i in ids], z_index, spacing)
    return SegData(np.stack(images), np.stack(masks), groups, ids, classes, "nifti",
                   volumes=volumes, label_unit="case", native=NativeSlices(sources, classes))


class NativeSlices:
    """`SegData.native` of a nifti dataset: slice z at its volume's own in-plane size, padded
    to a square as before the resize. Keeps the last volume it read: the SAM stage asks for
    images in index order, and a volume's slices are consecutive."""

    def __init__(self, sources: list[tuple[Path, int]], classes: list[str]) -> None:
        self.sources, self.classes = sources, classes
        self._last: tuple[Path, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last": None}  # a copy sent elsewhere reads its own volumes

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path, z = self.sources[index]
        if self._last is None or self._last[0] != path:
            volume = _read_image_volume(path)
            self._last = (path, volume, _read_labels(_gt_path(path), volume.shape, path, self.classes))
        _, volume, labels = self._last
        return pad_square(volume[..., z], float(volume[..., z].min())), pad_square(labels[..., z], 0)
