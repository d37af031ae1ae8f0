"""A preprocessed-dataset cache shared by every process of a node (`data.cache`, issue 14).

The first `load_dataset` of a data config builds the dataset (reads the files, resizes,
normalises) and writes the result under `data.cache_dir` (default `$SEMISEG_CACHE/data`, i.e.
`~/.cache/semiseg/data`), in a folder named by the cache key:

    images.npy  masks.npy   the arrays, as `np.save` writes them
    meta.json               every other SegData field (groups, ids, classes, positions, the
                            volumes' slices and spacing, the intensity statistics), as JSON:
                            nothing in the cache is unpickled
    manifest.json           size and CRC-32 of each file above, written last

Every later load, by any Train worker, Ray Data actor or benchmark on the node, memory-maps the
arrays read-only (`np.load(mmap_mode="r")`), so the page cache holds one copy of the images for
all of them and nothing is decoded again.

`SegData.native` (the source-resolution accessor the SAM stage reads) is a function, not data,
so it is not stored: a cached dataset that had one gets `RebuiltNative`, which builds the
dataset once, uncached, in the process that first asks for a native image.

The key is a hash of what the prepared arrays depend on and nothing else: the data config minus
the fields that only choose *which* images get labels or how they are batched (label_fraction,
label_unit, labeled_cases, batch_size: `semiseg.data.normalize` explains why the normalised
dataset does not depend on them), the source of every module of the `semiseg.data` package (a
loader change is a new key, never a stale cache), and for datasets read from `data.root` the
relative path, size and mtime of every file under it (an edited file is a new key).

Safety:
- A build is written into a temporary sibling folder and renamed into place (atomic on one
  filesystem): a reader sees no cache or a whole one, and an interrupted build leaves only the
  temporary folder, which the next build removes.
- Builders of one key on a node take an exclusive `flock` on `<key>.lock`: one builds, the others
  wait and then map its result (on a filesystem without flock both build and the rename keeps
  one).
- Each load checks every file's size and CRC-32 against the manifest; a mismatch (a truncated or
  altered file, a missing manifest) is reported on stderr, the folder is removed and rebuilt.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from semiseg.data.base import DATASETS, SegData, SliceOrigin
from semiseg.data_config import DataConfig
from semiseg.errors import DatasetError

FORMAT = 1  # bump when the folder's layout changes
ARRAYS = ("images", "masks")
FILES = ("images.npy", "masks.npy", "meta.json")
# DataConfig fields that choose labels, batches or the cache itself, not the prepared arrays.
NOT_IN_KEY = frozenset({"label_fraction", "label_unit", "labeled_cases", "batch_size", "cache", "cache_dir"})


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("SEMISEG_CACHE", Path.home() / ".cache" / "semiseg")) / "data"


def cache_key(cfg: DataConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    blob = json.dumps({"format": FORMAT, "data": fields, "code": _code_digest(),
                       "source": _source_listing(cfg.root)}, sort_keys=True)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cache_folder(cfg: DataConfig) -> Path:
    return cache_root(cfg) / cache_key(cfg)


def cached_load(cfg: DataConfig, build: Callable[[DataConfig], SegData]) -> SegData:
    """The dataset of `cfg`: mapped from the node's cache, or built by `build`, cached, mapped."""
    folder = cache_folder(cfg)
    if (data := _open_valid(folder, cfg)) is not None:
        return data
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{folder.parent}: could not create the data cache ({exc}); set "
                           "data.cache_dir to a writable folder or data.cache=false") from exc
    with _exclusive(folder.parent / f"{folder.name}.lock"):
        if (data := _open_valid(folder, cfg)) is not None:  # another process built it meanwhile
            return data
        _write(folder, build(cfg))
    return _open(folder, cfg)


def describe(cfg: DataConfig) -> tuple[Path, int]:
    """The cache folder of `cfg` and its size in bytes (0 if not built)."""
    folder = cache_folder(cfg)
    size = sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0
    return folder, size


def _open_valid(folder: Path, cfg: DataConfig) -> SegData | None:
    if not folder.is_dir():
        return None
    problem = _verify(folder)
    if problem is None:
        return _open(folder, cfg)
    print(f"semiseg: data cache {folder} is damaged ({problem}); rebuilding it", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _verify(folder: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"manifest.json unreadable: {exc}"
    for name in FILES:
        path, want = folder / name, files.get(name, {})
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != want.get("size") or _crc32(path) != want.get("crc32"):
            return f"{name} does not match its size and CRC-32 in manifest.json"
    return None


def _open(folder: Path, cfg: DataConfig) -> SegData:
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    meta = json.loads((folder / "meta.json").read_text())
    if meta.pop("has_native"):
        meta["native"] = RebuiltNative(cfg)
    if meta["volumes"] is not None:
        v = meta["volumes"]
        meta["volumes"] = SliceOrigin(v["volume"], v["z"], {k: tuple(s) for k, s in v["spacing"].items()})
    if meta["intensity"] is not None:
        from semiseg.data.normalize import IntensityStats  # normalize imports this package's base

        meta["intensity"] = IntensityStats(**{k: tuple(x) if isinstance(x, list) else x
                                             for k, x in meta["intensity"].items()})
    return SegData(**arrays, **meta)


def _meta(data: SegData) -> dict:
    """The SegData fields other than the arrays, as JSON-able values."""
    meta = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in ARRAYS}
    meta["has_native"] = meta.pop("native") is not None
    for key in ("volumes", "intensity"):
        if meta[key] is not None:
            meta[key] = dataclasses.asdict(meta[key])
    return meta


def _write(folder: Path, data: SegData) -> None:
    """Write `data` as `folder`, atomically."""
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # an interrupted earlier build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(data, name)))
        (tmp / "meta.json").write_text(json.dumps(_meta(data), default=_plain))
        files = {n: {"size": (tmp / n).stat().st_size, "crc32": _crc32(tmp / n)} for n in FILES}
        manifest = {"format": FORMAT, "source": data.source, "created": time.time(), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from the node's other users
        shutil.rmtree(folder, ignore_errors=True)  # a damaged one, already reported
        os.rename(tmp, folder)
    except OSError as exc:
        if not folder.is_dir():  # not a lost race with another builder: a real failure
            raise DatasetError(f"{folder}: could not write the data cache ({exc}); set "
                               "data.cache_dir to a writable folder or data.cache=false") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain(value: object) -> object:
    """numpy scalars (np.int64 slice indices, ...) as the Python numbers JSON knows."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} in a SegData field cannot be cached as JSON")


class RebuiltNative:
    """`SegData.native` of a cached dataset: the builder's own accessor, from one uncached build
    made the first time a native image is asked for (then kept). Picklable: a copy sent to
    another process builds its own."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self._native = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "_native": None}

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._native is None:
            self._native = DATASETS.get(self.cfg.name)(self.cfg).native
        return self._native(index)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _code_digest() -> str:
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*package.glob("*.py"), package.parent / "data_config.py"]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _source_listing(root: str) -> list[tuple[str, int, int]]:
    """Every file under a dataset's root as (relative path, size, mtime in ns); [] without one."""
    if not root or not Path(root).is_dir():
        return []
    base = Path(root)
    listing = []
    for dirpath, _, names in os.walk(base):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            listing.append((os.path.relpath(os.path.join(dirpath, name), base), st.st_size, st.st_mtime_ns))
    return sorted(listing)
