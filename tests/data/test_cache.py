"""The prepared-dataset cache (semiseg.data.cache): what it keys on, that a cached load is the
built dataset, that damage is detected and rebuilt, and that concurrent loaders build once."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.config import load_config
from semiseg.data import DATASETS, SegData, load_dataset
from semiseg.data.cache import cache_key, describe
from semiseg.data_config import DataConfig
from semiseg.errors import DatasetError

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(num_images=24, image_size=32, cache_dir=str(tmp_path / "cache"), **kw)


def test_cached_load_equals_a_fresh_build_and_maps_the_files(tmp_path) -> None:
    cfg = _cfg(tmp_path, native_size=48, normalize="dataset")
    first, again = load_dataset(cfg), load_dataset(cfg)
    fresh = load_dataset(DataConfig(**{**cfg.__dict__, "cache": False}))
    folder, size = describe(cfg)
    for data in (first, again):  # the first load hands back the mapped copy too
        assert isinstance(data.images, np.memmap) and Path(data.images.filename) == folder / "images.npy"
        assert not data.images.flags.writeable  # one shared copy: no process may change it
        assert np.array_equal(data.images, fresh.images) and np.array_equal(data.masks, fresh.masks)
        assert (data.groups, data.ids, data.classes, data.intensity) == \
            (fresh.groups, fresh.ids, fresh.classes, fresh.intensity)
        native_image, native_mask = data.native(3)  # rebuilt on first use, not unpickled
        assert native_image.shape == (48, 48) and np.array_equal(native_mask, fresh.native(3)[1])
    assert size > first.images.nbytes + first.masks.nbytes
    assert not isinstance(fresh.images, np.memmap)
    assert not (tmp_path / "cache").joinpath(folder.name + ".tmp").exists()


def test_key_ignores_what_only_picks_labels_or_batches_and_the_cache_is_not_identity(tmp_path) -> None:
    base = _cfg(tmp_path)
    same = _cfg(tmp_path, label_fraction=0.5, batch_size=2, labeled_cases=0)
    assert cache_key(base) == cache_key(same) == cache_key(_cfg(tmp_path / "elsewhere"))
    for changed in (_cfg(tmp_path, split_seed=1), _cfg(tmp_path, normalize="dataset"),
                    DataConfig(num_images=24, image_size=48, cache_dir=base.cache_dir)):
        assert cache_key(changed) != cache_key(base)
    quick = REPO / "experiments" / "quickstart.yaml"
    assert load_config(quick, ["data.cache=false", f"data.cache_dir={tmp_path}"]).config_hash() == \
        load_config(quick, []).config_hash()


def _folder_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.full((16, 16), 40 * len(stem) + ord(stem) % 7, np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 4:9] = 1
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text("classes: [background, organ]\n")
    return root


def test_an_edited_source_file_is_a_new_key_not_a_stale_cache(tmp_path) -> None:
    root = _folder_dataset(tmp_path / "ds")
    cfg = DataConfig(name="folder", root=str(root), image_size=16, cache_dir=str(tmp_path / "cache"))
    before = load_dataset(cfg)
    mask = np.zeros((16, 16), np.uint8)
    mask[0:12, 0:12] = 1
    Image.fromarray(mask).save(root / "masks" / "b.png")
    os.utime(root / "masks" / "b.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    after = load_dataset(cfg)
    assert int(after.masks[1].sum()) == 144 and int(before.masks[1].sum()) == 25


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_a_damaged_cache_is_reported_and_rebuilt(tmp_path, capsys, damage) -> None:
    cfg = _cfg(tmp_path)
    good = np.array(load_dataset(cfg).images)
    folder, _ = describe(cfg)
    target = folder / "images.npy"
    if damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[-100] ^= 0xFF
        target.write_bytes(bytes(raw))
    else:
        (folder / "manifest.json").unlink()
    rebuilt = load_dataset(cfg)
    err = capsys.readouterr().err
    assert f"data cache {folder} is damaged" in err and "rebuilding" in err
    assert np.array_equal(rebuilt.images, good)
    assert load_dataset(cfg) is not None and capsys.readouterr().err == ""  # whole again


def test_an_interrupted_build_leaves_no_cache_and_the_next_build_clears_its_remains(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    folder, _ = describe(cfg)
    folder.parent.mkdir(parents=True)
    remains = folder.parent / f"{folder.name}.tmp-killed"  # what a build killed mid-write leaves
    remains.mkdir()
    (remains / "images.npy").write_bytes(b"\x93NUMPY half")
    assert not folder.exists()
    load_dataset(cfg)
    assert folder.is_dir() and not remains.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "manifest.json", "masks.npy", "meta.json"]


def test_a_failing_build_writes_nothing(tmp_path) -> None:
    cfg = DataConfig(name="folder", root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        load_dataset(cfg)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_an_unusable_cache_dir_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match=r"a_file.*could not (create|write) the data cache.*data.cache=false"):
        load_dataset(DataConfig(num_images=8, image_size=16, cache_dir=str(blocker / "cache")))


def test_cache_false_builds_in_process_and_writes_nothing(tmp_path) -> None:
    data = load_dataset(_cfg(tmp_path, cache=False))
    assert not isinstance(data.images, np.memmap) and not (tmp_path / "cache").exists()


# Concurrent loaders: a registered probe dataset that records each build and is slow enough
# for the loaders to overlap. Forked children inherit the registration.
BUILDS = "SEMISEG_TEST_BUILDS"


def _probe(cfg: DataConfig) -> SegData:
    with open(os.environ[BUILDS], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    rng = np.random.default_rng(0)
    masks = (rng.random((6, 8, 8)) > 0.5).astype(np.int64)
    return SegData(rng.random((6, 8, 8), dtype=np.float32), masks, [f"g{i}" for i in range(6)],
                   [f"i{i}" for i in range(6)], ["background", "fg"], "cache_probe")


@pytest.fixture
def probe_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv(BUILDS, str(tmp_path / "builds.txt"))
    DATASETS.register("cache_probe")(_probe)
    yield
    DATASETS._items.pop("cache_probe")


def _load_and_report(cfg: DataConfig, out: "multiprocessing.Queue") -> None:
    data = load_dataset(cfg)
    out.put((os.getpid(), str(data.images.filename), float(np.asarray(data.images).sum())))


def test_concurrent_loaders_build_once_and_map_one_file(tmp_path, probe_dataset) -> None:
    cfg = DataConfig(name="cache_probe", cache_dir=str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_load_and_report, args=(cfg, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len((tmp_path / "builds.txt").read_text().split()) == 1  # one built, two waited
    folder, _ = describe(cfg)
    assert {r[1] for r in results} == {str(folder / "images.npy")} and len({r[2] for r in results}) == 1


def test_a_volume_dataset_keeps_its_slices_spacing_channels_and_ct_statistics(tmp_path) -> None:
    from tests.conftest import write_nnunet_dataset

    root = write_nnunet_dataset(tmp_path / "Dataset001_Toy")
    cfg = DataConfig(name="nnunet", root=str(root), image_size=16, normalize="ct",
                     cache_dir=str(tmp_path / "cache"))
    load_dataset(cfg)
    cached, fresh = load_dataset(cfg), load_dataset(DataConfig(**{**cfg.__dict__, "cache": False}))
    assert isinstance(cached.images, np.memmap) and cached.images.shape == fresh.images.shape
    assert np.array_equal(cached.images, fresh.images) and cached.volumes == fresh.volumes
    assert cached.intensity == fresh.intensity and cached.intensity.lower is not None
    assert (cached.channel_names, cached.label_unit, cached.positions) == \
        (fresh.channel_names, fresh.label_unit, fresh.positions)


def test_a_mapped_split_gathers_the_rows_a_copied_split_holds(tmp_path) -> None:
    """On the CPU, splits of a mapped cache are gathered per access (no per-worker copy), and
    every access the trainer makes reads what the copied split holds."""
    import torch

    from semiseg.data.sampling import GatheredRows, split_tensors
    from semiseg.data.splits import make_split

    cfg = _cfg(tmp_path, label_fraction=0.25)
    mapped, copied = load_dataset(cfg), load_dataset(DataConfig(**{**cfg.__dict__, "cache": False}))
    split = make_split(copied, cfg, seed=0)
    lazy, eager = (split_tensors(d, split, torch.device("cpu")) for d in (mapped, copied))
    assert isinstance(lazy.unlabeled.images, GatheredRows) and isinstance(eager.unlabeled.images, torch.Tensor)
    pick = torch.tensor([2, 0, 2])
    for part in ("labeled", "unlabeled", "val", "test"):
        a, b = getattr(lazy, part), getattr(eager, part)
        assert a.images.shape == b.images.shape and len(a.images) == len(b.images) and a.images.dim() == 4
        for key in (pick, slice(1, 3), (1, 0), (slice(None), 0), (pick, 0, 3)):
            assert torch.equal(a.images[key], b.images[key]) and a.images[key].dtype == torch.float32
        if b.masks is not None:
            assert torch.equal(a.masks.cpu(), b.masks) and a.masks[pick].dtype == torch.int64
    assert torch.equal(lazy.hidden_unlabeled_masks[pick], eager.hidden_unlabeled_masks[pick])
    lazy.unlabeled.images[pick].add_(1)  # a batch is the caller's own copy: the cache is unchanged
    assert torch.equal(lazy.unlabeled.images[pick], eager.unlabeled.images[pick])


def test_training_on_a_mapped_cache_equals_training_on_a_copy(tmp_path) -> None:
    import torch

    from semiseg.data.splits import make_split
    from semiseg.engine import build_trainer, fit

    overrides = ["data.image_size=32", "data.num_images=24", "data.label_fraction=0.25", "data.batch_size=4",
                 "model.base_channels=4", "model.depth=2", "train.epochs=1", "train.steps_per_epoch=3",
                 "train.device=cpu", "method.name=reference_guided", f"data.cache_dir={tmp_path / 'cache'}"]
    results = []
    for cache in ("true", "false"):
        cfg = load_config(None, [*overrides, f"data.cache={cache}"])
        data = load_dataset(cfg.data)
        trainer = build_trainer(cfg, data, make_split(data, cfg.data, 0), torch.device("cpu"))
        results.append(fit(trainer, tmp_path / f"run-{cache}").test_metrics)
    assert results[0] == results[1]
