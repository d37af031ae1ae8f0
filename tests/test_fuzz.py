"""Fuzzing the two doors user input comes through: configs and dataset files.

The property is the same everywhere: a load either succeeds or raises one of semiseg's own
errors (a SemisegError, which the CLI prints as one line naming what is wrong); never a
KeyError, TypeError, AttributeError, yaml/PIL/nibabel/numpy error or a traceback.

Inputs are drawn near the valid ones as well as at random: real section and field names,
real method parameter names, mutated copies of valid PNG and NIfTI files, so that the
examples get past the first check and reach the deeper ones. Bounded: ~60 examples each.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from semiseg.config import Config, DataConfig, from_dict, load_config
from semiseg.data import load_dataset
from semiseg.errors import SemisegError
from semiseg.methods import METHODS

# SEMISEG_FUZZ_EXAMPLES=5000 runs a long random search; the default is a fixed, fast sample.
_EXAMPLES = int(os.environ.get("SEMISEG_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXAMPLES or 60, deadline=None, derandomize=not _EXAMPLES,
                database=None, suppress_health_check=[HealthCheck.too_slow])


def field_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every field of the schema as dotted key -> type hint, e.g. 'train.lr': float."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_types(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


TYPES = field_types()
for _name in METHODS.names():
    TYPES.update({f"method.params.{k}": v
                  for k, v in field_types(METHODS.get(_name).Config).items()})
KEYS = sorted(TYPES)
NAMES = METHODS.names() + ["folder", "nifti", "synthetic", "auto", "cpu", "unet", ""]
scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(NAMES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def near_valid(hint: Any) -> st.SearchStrategy:
    """Values of the field's own type, around the edges of its valid range."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(near_valid(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), values, max_size=2)
    return {bool: st.booleans(), int: st.integers(-2, 70), str: st.sampled_from(NAMES),
            float: st.floats(-0.5, 1.5) | st.floats()}.get(hint, values)


key_parts = st.sampled_from(sorted({p for k in KEYS for p in k.split(".")})) | st.text(max_size=6)
keys = st.sampled_from(KEYS) | st.lists(key_parts, min_size=1, max_size=4).map(".".join)
# (key, value) pairs: a real key with a value of its own type, or anything at all.
items = (st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), near_valid(TYPES[k])))
         | st.tuples(keys, values))
configs = st.lists(items, max_size=6).map(dict)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} -> {'a': {'b': 1}}; a clash keeps whatever nests first (still random data)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[parts[-1]] = value
    return out


def accepts_or_refuses(call) -> None:
    try:
        call()
    except SemisegError:
        pass


# ---- configs ---------------------------------------------------------------------------------


@FUZZ
@given(configs)
def test_fuzz_config_dicts(flat: dict[str, Any]) -> None:
    accepts_or_refuses(lambda: from_dict(nest(flat)))


@FUZZ
@given(configs | values)
def test_fuzz_config_files(data: Any) -> None:
    """Random data dumped as YAML, then read from a real file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experiment.yaml"
        path.write_text(yaml.safe_dump(nest(data) if isinstance(data, dict) else data))
        accepts_or_refuses(lambda: load_config(path))


yaml_chars = st.sampled_from(list(":-[]{},#&*!|>'\"%@` \n\t.0123456789eE+_abcdnrtuy~\\"))
yaml_texts = (st.text(yaml_chars, max_size=60) | st.text(max_size=40)
              | st.lists(st.sampled_from(KEYS), max_size=4).map(
                  lambda ks: "".join(f"{k.split('.')[0]}:\n  {k.split('.')[-1]}: x\n" for k in ks)))


@FUZZ
@given(yaml_texts | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_fuzz_config_texts(text: str) -> None:
    """Raw YAML-ish text, including invalid syntax, tabs, anchors and stray bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experiment.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        accepts_or_refuses(lambda: load_config(path))


def as_override(item: tuple[str, Any]) -> str:
    return f"{item[0]}={yaml.safe_dump(item[1], default_flow_style=True).strip()}"


overrides = st.lists(items.map(as_override) | st.tuples(keys, st.text(yaml_chars, max_size=20))
                     .map("".join), max_size=4)


@FUZZ
@given(overrides)
def test_fuzz_overrides(items: list[str]) -> None:
    """`key=value` as typed on a command line (sometimes without the '=')."""
    accepts_or_refuses(lambda: load_config(None, items))


# ---- dataset files ---------------------------------------------------------------------------


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


VALID_IMAGE = png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))
VALID_MASK = png_bytes(np.tile(np.array([0, 1, 2, 1], np.uint8), (8, 2)))


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid file with a few bytes overwritten, or cut short, or both."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@st.composite
def random_png(draw: st.DrawFn) -> bytes:
    """A valid PNG of any common mode, size and content (not a valid *mask* in general)."""
    mode, dtype, channels = draw(st.sampled_from([
        ("L", np.uint8, 0), ("I;16", np.uint16, 0), ("RGB", np.uint8, 3),
        ("RGBA", np.uint8, 4), ("LA", np.uint8, 2), ("P", np.uint8, 0), ("1", bool, 0)]))
    # Mostly the size of the other files (so it gets past the size check), sometimes not.
    h, w = draw(st.sampled_from([(8, 8), (8, 8), (8, 8), (1, 9), (9, 8), (3, 3)]))
    shape = (h, w, channels) if channels else (h, w)
    high = {bool: 2, np.uint8: 256, np.uint16: 65536}[dtype]
    high = min(high, draw(st.sampled_from([2, 3, 4, high])))  # class-like values, or anything
    array = np.random.default_rng(draw(st.integers(0, 99))).integers(0, high, shape)
    image = Image.fromarray(array.astype(dtype))
    return png_bytes(image.convert("P") if mode == "P" else image)


def folder_dataset(root: Path, files: dict[str, bytes]) -> DataConfig:
    """Three valid image/mask pairs, then `files` (relative path -> bytes) written over them."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for stem in ("a", "b", "c"):
        (root / "images" / f"{stem}.png").write_bytes(VALID_IMAGE)
        (root / "masks" / f"{stem}.png").write_bytes(VALID_MASK)
    (root / "dataset.yaml").write_text("classes: [background, liver, kidney]\n")
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return DataConfig(name="folder", root=str(root), image_size=8)


png_contents = st.binary(max_size=80) | mutated(VALID_IMAGE) | mutated(VALID_MASK) | random_png()
png_targets = st.sampled_from(["images/a.png", "masks/b.png", "masks/c.png", "images/c.png",
                               "images/new.png"])
class_names = st.sampled_from(["background", "liver", "kidney", "", "liver", "1"])
group_patterns = st.sampled_from(["", "^(\\w)", "(", "^x(\\d+)", "no_group", "^(a|b|c)$"])
class_lists = (st.sampled_from([["background", "liver", "kidney"], ["background", "liver"],
                                ["bg", "a", "b", "c"]]) | st.lists(class_names, max_size=5))
dataset_yamls = (yaml_texts | st.tuples(class_lists, group_patterns).map(
    lambda cp: yaml.safe_dump({"classes": cp[0], **({"group_pattern": cp[1]} if cp[1] else {})})))


def load_folder(files: dict[str, bytes]) -> None:
    root = Path(tempfile.mkdtemp())
    try:
        accepts_or_refuses(lambda: load_dataset(folder_dataset(root, files)))
    finally:
        shutil.rmtree(root)


@FUZZ
@given(st.dictionaries(png_targets, png_contents, min_size=1, max_size=2))
def test_fuzz_folder_pngs(files: dict[str, bytes]) -> None:
    """Random bytes, damaged PNGs and valid PNGs of any mode as images and masks."""
    load_folder(files)


@FUZZ
@given(dataset_yamls)
def test_fuzz_folder_spec(text: str) -> None:
    """dataset.yaml: random text, and class lists / group patterns near valid ones."""
    load_folder({"dataset.yaml": text.encode()})


def nifti_bytes(data: np.ndarray) -> bytes:
    """An uncompressed .nii file's bytes."""
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


VALID_VOLUME = nifti_bytes(np.random.default_rng(0).normal(size=(6, 6, 2)).astype(np.float32))
VALID_LABELS = nifti_bytes(np.tile(np.arange(4, dtype=np.uint8), (6, 3, 1)).reshape(6, 6, 2))


def nifti_dataset(root: Path, name: str, data: bytes) -> DataConfig:
    """Three valid patients; then patient002's file `name` holds `data`."""
    for p in ("patient001", "patient002", "patient003"):
        (root / p).mkdir(parents=True)
        (root / p / f"{p}_frame01.nii.gz").write_bytes(gzip.compress(VALID_VOLUME))
        (root / p / f"{p}_frame01_gt.nii.gz").write_bytes(gzip.compress(VALID_LABELS))
    (root / "patient002" / name).write_bytes(data)
    return DataConfig(name="nifti", root=str(root), image_size=8)


# Mutated headers recompressed, so the gzip layer is valid and nibabel parses the damage.
nifti_contents = (st.binary(max_size=400)
                  | mutated(VALID_VOLUME).map(gzip.compress)
                  | mutated(VALID_LABELS).map(gzip.compress)
                  | mutated(gzip.compress(VALID_VOLUME)))


@FUZZ
@given(st.sampled_from(["patient002_frame01.nii.gz", "patient002_frame01_gt.nii.gz"]),
       nifti_contents)
def test_fuzz_nifti_dataset(name: str, data: bytes) -> None:
    root = Path(tempfile.mkdtemp())
    try:
        accepts_or_refuses(lambda: load_dataset(nifti_dataset(root, name, data)))
    finally:
        shutil.rmtree(root)


def test_fuzz_helpers_reach_both_outcomes(tmp_path: Path) -> None:
    """The fuzzed fixtures are valid before mutation (so mutants start near valid input), and
    a broken file is refused: the property above is not vacuous."""
    assert load_dataset(folder_dataset(tmp_path / "f", {})).images.shape == (3, 8, 8)
    assert len(load_dataset(nifti_dataset(tmp_path / "n", "x", b"")).ids) == 6
    try:
        load_dataset(folder_dataset(tmp_path / "g", {"masks/a.png": b"junk"}))
    except SemisegError as exc:
        assert "masks/a.png" in str(exc)
    else:
        raise AssertionError("a junk mask was accepted")
