"""P7: the prepared-dataset cache at scale (issue 14), on a generated 20 000-slice `folder` dataset.

    python bench/data_cache.py                         # 20 000 slices, 64x64, workers 1 2 4
    python bench/data_cache.py --slices 2000 --workers 1 2   # a quick look

1. Writes `--slices` synthetic phantoms as PNG image/mask pairs (a `folder` dataset; kept in
   --root and reused by a later run).
2. Load times, in this process: the uncached build (`data.cache=false`: decode, resize,
   normalise), the first cached load (the same build plus writing the cache), the cached load
   (map the files and check their CRC-32).
3. Memory of N real Ray Train workers (TorchTrainer, N x 0.5 CPU) on this node, each doing what
   a trial does with its data: `load_dataset`, `make_split`, `split_tensors` on CPU, then a
   read of every row of every split (as an epoch and an evaluation do: it maps their pages).
   Each reports, from /proc/self/smaps_rollup, RSS and PSS (proportional set size: a page
   mapped by k processes counts 1/k in each) before loading and after; the table sums them over
   the workers, with the cache off and on.

Target (issue 14): summed RSS grows by < 10 % per added worker, and the cached load is >= 10x
faster than the first. RSS counts a shared page once in *every* process that maps it, so the
summed RSS of workers that share one mapped copy still grows by the copy per worker; PSS shows
what the node actually holds, which is the figure the target is about.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rdc", dir="/tmp"))  # short socket paths
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray of its own, no tokens

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from semiseg.data import load_dataset  # noqa: E402
from semiseg.data.cache import describe  # noqa: E402
from semiseg.data.synthetic import CLASSES, native_phantom  # noqa: E402
from semiseg.data_config import DataConfig  # noqa: E402


def _write_one(args: tuple[Path, int, int]) -> None:
    root, index, size = args
    image, mask = native_phantom(index, size)
    scaled = np.clip((image - image.min()) / max(float(np.ptp(image)), 1e-6) * 255, 0, 255)
    Image.fromarray(scaled.astype(np.uint8)).save(root / "images" / f"slice{index:05d}.png")
    Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"slice{index:05d}.png")


def write_dataset(root: Path, slices: int, size: int) -> Path:
    marker = root / f".complete-{slices}-{size}"
    if marker.exists():
        print(f"dataset: reusing {root} ({slices} slices)", flush=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(f"classes: [{', '.join(CLASSES)}]\n")
    start = time.time()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write_one, [(root, i, size) for i in range(slices)], 64)):
            if done % 5000 == 4999:
                print(f"dataset: {done + 1}/{slices} slices written", flush=True)
    marker.touch()
    print(f"dataset: {slices} PNG pairs in {time.time() - start:.0f} s -> {root}", flush=True)
    return root


def load_times(cfg: DataConfig) -> dict[str, float]:
    uncached = dataclasses.replace(cfg, cache=False)
    times = {}
    for name, config in (("uncached build", uncached), ("first load, cache on", cfg), ("cached load", cfg)):
        start = time.time()
        data = load_dataset(config)
        times[name] = time.time() - start
        print(f"{name}: {times[name]:.2f} s ({len(data.images)} images)", flush=True)
        del data
    return times


def _smaps() -> dict[str, int]:
    """Rss and Pss of this process in bytes."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"]}


def _worker_loop(config: dict) -> None:
    """In each Train worker: what a trial does with its data (load, split, read every row), then
    this process's memory, written to out/<rank>.json (Ray Train keeps rank 0's reports only)."""
    import json

    import ray.train
    import torch
    import torch.distributed

    from semiseg.data.sampling import split_tensors
    from semiseg.data.splits import make_split

    before = _smaps()
    data_cfg = DataConfig(**config["data"])
    data = load_dataset(data_cfg)
    tensors = split_tensors(data, make_split(data, data_cfg, seed=0), torch.device("cpu"))
    parts = (tensors.labeled, tensors.unlabeled, tensors.val, tensors.test)
    for part in parts:  # read every row once, as an epoch and an evaluation do (maps its pages)
        part.images[:].sum()
        if part.masks is not None:
            part.masks[:].sum()
    # Every worker measures once all have mapped their pages, and none exits (unmapping them)
    # before all have measured: PSS splits a page among the processes mapping it *now*.
    torch.distributed.barrier()
    after = _smaps()
    torch.distributed.barrier()
    rank = ray.train.get_context().get_world_rank()
    figures = {"images": sum(map(len, parts)),
               **{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in after.items()}}
    (Path(config["out"]) / f"{rank}.json").write_text(json.dumps(figures))


def worker_memory(cfg: DataConfig, workers: int, storage: Path) -> dict[str, float]:
    """Memory summed over `workers` Train workers after they loaded `cfg`'s data, in GiB."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(tempfile.mkdtemp(prefix="p7-", dir=storage.parent))
    name = f"p7-{workers}w-cache-{'on' if cfg.cache else 'off'}-{time.time_ns()}"
    TorchTrainer(_worker_loop, train_loop_config={"data": cfg.__dict__, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(storage), name=name)).fit()
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    if len(ranks) != workers:
        raise RuntimeError(f"{len(ranks)} of {workers} workers wrote their memory to {out}")
    gib = 2**30
    summed = {k: sum(r[f"after_{k}"] for r in ranks) / gib for k in ("rss", "pss")}
    data = {f"data_{k}": sum(r[f"after_{k}"] - r[f"before_{k}"] for r in ranks) / gib for k in ("rss", "pss")}
    return summed | data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=20000)
    p.add_argument("--size", type=int, default=64, help="PNG size and data.image_size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--root", type=Path, default=Path("/tmp/semiseg_p7"))
    args = p.parse_args()
    root = write_dataset(args.root / "dataset", args.slices, args.size)
    cache_dir = args.root / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = DataConfig(name="folder", root=str(root), image_size=args.size, cache_dir=str(cache_dir))
    times = load_times(cfg)
    folder, size = describe(cfg)
    print(f"cache: {size / 2**20:.0f} MiB in {folder}", flush=True)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = {}
    for cache in (False, True):
        for n in args.workers:
            rows[(cache, n)] = worker_memory(dataclasses.replace(cfg, cache=cache), n, args.root / "ray")
            print(f"cache {'on' if cache else 'off'}, {n} worker(s): {rows[(cache, n)]}", flush=True)
    ray.shutdown()
    report(args, times, rows)
    return 0


def report(args: argparse.Namespace, times: dict[str, float], rows: dict) -> None:
    print(f"\n### P7 ({args.slices} slices {args.size}x{args.size}; `python bench/data_cache.py "
          f"--slices {args.slices} --size {args.size}`)\n")
    print("| load | seconds |\n|---|---|")
    for name, value in times.items():
        print(f"| {name} | {value:.2f} |")
    print(f"| **uncached build ÷ cached load** | **{times['uncached build'] / times['cached load']:.1f}×** |")
    print("\n| cache | workers | summed RSS GiB | summed PSS GiB | data RSS GiB | data PSS GiB | "
          "PSS growth per added worker | data PSS growth per added worker |\n|---|---|---|---|---|---|---|---|")
    first = min(args.workers)

    def growth(r: dict, base: dict, key: str, n: int) -> str:
        return "-" if n == first else f"{(r[key] - base[key]) / (n - first) / base[key]:+.0%}"

    for (cache, n), r in rows.items():
        base = rows[(cache, first)]
        print(f"| {'on' if cache else 'off'} | {n} | {r['rss']:.2f} | {r['pss']:.2f} | {r['data_rss']:.2f} | "
              f"{r['data_pss']:.2f} | {growth(r, base, 'pss', n)} | {growth(r, base, 'data_pss', n)} |")


if __name__ == "__main__":
    sys.exit(main())
