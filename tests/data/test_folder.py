"""The folder dataset (PNG images + masks + dataset.yaml): the happy path and every error."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data import load_dataset
from semiseg.errors import DatasetError

CLASSES = ["background", "liver", "kidney"]


def _write(root: Path, stems=("p1_a", "p1_b", "p2_a"), size=(24, 20), yaml_text=None) -> Path:
    """A valid dataset: 8-bit images, masks with values 0..2, images WxH = size."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem in stems:
        img = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[2:8, 3:10], mask[10:15, 5:12] = 1, 2
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text(yaml_text or "classes: [background, liver, kidney]\n")
    return root


def _load(root: Path, size: int = 32):
    return load_dataset(DataConfig(name="folder", root=str(root), image_size=size))


def _fails(root: Path, *fragments: str) -> None:
    with pytest.raises(DatasetError) as err:
        _load(root)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_happy_path(tmp_path):
    d = _load(_write(tmp_path))
    assert d.images.shape == d.masks.shape == (3, 32, 32) and d.images.dtype == np.float32
    assert d.classes == CLASSES and d.source == "folder"
    assert d.ids == d.groups == ["p1_a", "p1_b", "p2_a"]  # default: each image its own group
    assert set(np.unique(d.masks)) == {0, 1, 2}
    assert np.allclose(d.images.std(axis=(1, 2)), 1, atol=1e-3)


def test_group_pattern_and_deep_or_colour_images(tmp_path):
    spec = "classes: [background, liver, kidney]\ngroup_pattern: '^(p\\d+)_'\n"
    root = _write(tmp_path, yaml_text=spec)
    ramp = (np.arange(20 * 24).reshape(20, 24) * 130).astype(np.uint16)  # needs 16 bit
    Image.fromarray(ramp).save(root / "images" / "p1_a.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "images" / "p2_a.png")
    d = _load(root, size=24)
    assert d.groups == ["p1", "p1", "p2"]
    # 16-bit values kept: the ramp stays strictly increasing along a row after the pad+resize.
    row = d.images[0][12, 2:22]
    assert (np.diff(row) > 0).all()


def test_group_pattern_without_match(tmp_path):
    spec = "classes: [background, liver, kidney]\ngroup_pattern: '^(x\\d+)'\n"
    root = _write(tmp_path, yaml_text=spec)
    _fails(root, "p1_a.png", "group_pattern")


def test_palette_and_16bit_masks_accepted(tmp_path):
    root = _write(tmp_path)
    mask = np.zeros((20, 24), np.uint8)
    mask[4:9, 4:9] = 2
    Image.fromarray(mask).convert("P").save(root / "masks" / "p1_a.png")
    Image.fromarray(mask.astype(np.uint16)).save(root / "masks" / "p1_b.png")
    d = _load(root)
    assert 2 in d.masks[0] and 2 in d.masks[1]


def test_root_errors(tmp_path):
    with pytest.raises(DatasetError, match="data.root is empty"):
        load_dataset(DataConfig(name="folder", root="", image_size=32))
    (tmp_path / "file.txt").write_text("x")
    _fails(tmp_path / "file.txt", "file.txt", "not a directory")
    _fails(tmp_path / "absent", "absent", "not a directory")


@pytest.mark.parametrize("missing", ["images", "masks", "dataset.yaml"])
def test_missing_parts(tmp_path, missing):
    root = _write(tmp_path)
    target = root / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    _fails(root, missing)


@pytest.mark.parametrize(
    "text, fragment",
    [("classes: [a, b\n", "not valid YAML"), ("names: [a, b]\n", "missing 'classes'"),
     ("classes: background\n", "list of at least 2"), ("- a\n- b\n", "missing 'classes'")],
)
def test_bad_yaml(tmp_path, text, fragment):
    _fails(_write(tmp_path, yaml_text=text), "dataset.yaml", fragment)


def test_empty_images_folder(tmp_path):
    root = _write(tmp_path, stems=())
    _fails(root, "no images in", str(root / "images"))


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_corrupt_file(tmp_path, folder):
    root = _write(tmp_path)
    (root / folder / "p1_b.png").write_bytes(b"definitely not a png")
    _fails(root, f"{folder}/p1_b.png", "cannot read")


def test_truncated_png(tmp_path):
    root = _write(tmp_path, size=(200, 200))
    path = root / "images" / "p2_a.png"
    path.write_bytes(path.read_bytes()[:2000])
    _fails(root, "p2_a.png")


def test_image_without_mask_and_mask_without_image(tmp_path):
    root = _write(tmp_path)
    (root / "masks" / "p1_b.png").unlink()
    _fails(root, "p1_b")
    other = _write(tmp_path / "two")
    (other / "images" / "p2_a.png").unlink()
    _fails(other, "p2_a", "mask")


def test_duplicate_stems(tmp_path):
    root = _write(tmp_path)
    (root / "images" / "p1_a.PNG").write_bytes((root / "images" / "p1_a.png").read_bytes())
    _fails(root, "duplicate stem", "p1_a.PNG", "p1_a.png")


def test_non_png_file(tmp_path):
    root = _write(tmp_path)
    (root / "images" / "notes.txt").write_text("hi")
    _fails(root, "notes.txt", "PNG")


def test_mask_size_mismatch(tmp_path):
    root = _write(tmp_path)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "p1_a.png")
    _fails(root, "masks/p1_a.png", "12x10", "24x20")


def test_mask_values_outside_class_map(tmp_path):
    root = _write(tmp_path)
    mask = np.zeros((20, 24), np.uint8)
    mask[0, 0], mask[1, 1] = 3, 7
    Image.fromarray(mask).save(root / "masks" / "p2_a.png")
    _fails(root, "masks/p2_a.png", "[3, 7]", "0..2")


def test_rgb_mask(tmp_path):
    root = _write(tmp_path)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / "masks" / "p1_a.png")
    _fails(root, "masks/p1_a.png", "RGB", "single-channel integer")
