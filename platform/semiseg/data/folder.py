"""The format users bring: a folder of PNG images, PNG label masks and a class map.

    root/
      dataset.yaml      classes: [background, liver, ...]   (index = mask value)
                        group_pattern: '^(patient\\d+)_'     (optional; first regex group of a
                                                             file stem is its patient id)
      images/<stem>.png grayscale, 8 or 16 bit (colour is converted to grayscale)
      masks/<stem>.png  single-channel integer labels (mode L, P, I or I;16), same size as image

Non-square images are padded to a square (background) before the resize, keeping their aspect.
Images may differ in size: each is resized on its own, and the SAM stage refines each at its
own (padded) PNG size (`SegData.native`).

Every problem is a DatasetError that names the file at fault and what was expected.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from semiseg.data_config import DataConfig
from semiseg.data.base import DATASETS, SegData, check_classes_present
from semiseg.data.resize import pad_square, resize_pair
from semiseg.errors import DatasetError

_INT_MASK_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B"}
_RAW_IMAGE_MODES = {"I", "I;16", "I;16L", "I;16B", "F"}  # kept at full depth, not cut to 8 bit


def read_spec(spec_file: Path) -> tuple[list[str], re.Pattern[str] | None]:
    """(classes, compiled group_pattern or None) from a dataset.yaml; also used by `nifti`."""
    if not spec_file.is_file():
        raise DatasetError(f"missing {spec_file}: expected a YAML file with 'classes: [...]'")
    try:
        spec: Any = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    # ValueError: an int over Python's 4300-digit limit; RecursionError: absurd nesting.
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError, OSError) as exc:
        raise DatasetError(f"{spec_file}: not valid YAML: {str(exc)[:300]}") from None
    if not isinstance(spec, dict) or "classes" not in spec:
        raise DatasetError(
            f"{spec_file}: missing 'classes' (expected e.g. classes: [background, liver])"
        )
    classes = spec["classes"]
    names_ok = isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)
    if not names_ok or len(classes) < 2 or len(set(classes)) != len(classes):
        raise DatasetError(
            f"{spec_file}: 'classes' must be a list of at least 2 unique names, background first "
            f"(got {classes!r})"
        )
    pattern = spec.get("group_pattern")
    if pattern is None:
        return classes, None
    try:
        compiled = re.compile(str(pattern))
    except re.error as exc:
        raise DatasetError(
            f"{spec_file}: group_pattern {pattern!r} is not a valid regex: {exc}"
        ) from None
    if compiled.groups < 1:
        raise DatasetError(
            f"{spec_file}: group_pattern {pattern!r} needs a (group) for the patient id"
        )
    return classes, compiled


def _list_pngs(folder: Path) -> dict[str, Path]:
    """stem -> file for the PNGs of `folder`; refuses duplicate stems and non-PNG files."""
    by_stem: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue  # .DS_Store and the like
        by_stem.setdefault(f.stem, []).append(f)
    for stem, files in by_stem.items():
        if len(files) > 1:
            raise DatasetError(
                f"{folder}: duplicate stem {stem!r} ({', '.join(f.name for f in files)}); "
                "expected one file per stem"
            )
        if files[0].suffix.lower() != ".png":
            raise DatasetError(f"{files[0]}: not a PNG file; expected only .png files in {folder}")
    return {stem: files[0] for stem, files in by_stem.items()}


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad files
        raise DatasetError(f"{path}: cannot read the PNG ({exc}); is the file corrupt?") from None
    return img


def _read_image(path: Path) -> np.ndarray:
    img = _open(path)
    if img.mode not in _RAW_IMAGE_MODES:
        img = img.convert("L")
    return np.asarray(img).astype(np.float32)


def _read_mask(
    path: Path, image_size: tuple[int, ...], image_path: Path, classes: list[str]
) -> np.ndarray:
    img = _open(path)
    if img.mode not in _INT_MASK_MODES:
        raise DatasetError(
            f"{path}: mask has mode {img.mode}; expected a single-channel integer PNG "
            f"(mode L, P, I or I;16) whose values index the classes"
        )
    mask = np.asarray(img).astype(np.int64)
    if mask.shape != image_size:
        raise DatasetError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} "
            f"is {image_size[1]}x{image_size[0]}"
        )
    bad = np.unique(mask[(mask < 0) | (mask >= len(classes))])
    if bad.size:
        raise DatasetError(
            f"{path}: mask values {bad.tolist()[:10]} are outside the class map "
            f"0..{len(classes) - 1} ({', '.join(classes)})"
        )
    return mask


def _group(stem: str, pattern: re.Pattern[str] | None, path: Path, root: Path) -> str:
    """The patient id of a stem: the first group of group_pattern, else the stem itself."""
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None or not match.group(1):
        raise DatasetError(
            f"{path}: group_pattern {pattern.pattern!r} in {root / 'dataset.yaml'} does not "
            "match its stem (expected its first group to give the patient id)"
        )
    return match.group(1)


@DATASETS.register("folder")
def build(cfg: DataConfig) -> SegData:
    """Load cfg.root (see the module docstring), resized to cfg.image_size."""
    if not cfg.root:
        raise DatasetError(
            "data.root is empty: the folder dataset needs a folder with images/, masks/ "
            "and dataset.yaml"
        )
    root = Path(cfg.root)
    if not root.is_dir():
        raise DatasetError(
            f"data.root {root} is not a directory (expected images/, masks/, dataset.yaml)"
        )
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DatasetError(f"missing folder {root / sub} (expected <stem>.png files)")
    classes, pattern = read_spec(root / "dataset.yaml")
    images, masks = _list_pngs(root / "images"), _list_pngs(root / "masks")
    if not images:
        raise DatasetError(f"no images in {root / 'images'} (expected <stem>.png files)")
    for have, other, where in ((images, masks, "masks"), (masks, images, "images")):
        missing = sorted(set(have) - set(other))
        if missing:
            kind, expected = ("image" if where == "masks" else "mask"), root / where
            raise DatasetError(
                f"{kind} {have[missing[0]]} has no matching file {expected / missing[0]}.png "
                f"({len(missing)} unpaired stem(s): {', '.join(missing[:5])})"
            )
    ids = sorted(images)
    groups = [_group(stem, pattern, images[stem], root) for stem in ids]
    files = [(images[stem], masks[stem]) for stem in ids]
    out_images, out_masks = [], []
    for index in range(len(files)):
        image, mask = resize_pair(*native_pair(files, classes, index), cfg.image_size)
        out_images.append(image)  # raw: load_dataset normalises (data.normalize)
        out_masks.append(mask)
    check_classes_present(np.stack(out_masks), classes, root, root / "dataset.yaml")
    return SegData(np.stack(out_images), np.stack(out_masks), groups, ids, classes, "folder",
                   native=functools.partial(native_pair, files, classes))


def native_pair(files: list[tuple[Path, Path]], classes: list[str], index: int,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` and its mask at the PNG's own size, padded to a square (what the resize to
    image_size starts from): `SegData.native`, read from disk again by the SAM stage."""
    image_path, mask_path = files[index]
    image = _read_image(image_path)
    mask = _read_mask(mask_path, image.shape, image_path, classes)
    return pad_square(image, float(image.min())), pad_square(mask, 0)
