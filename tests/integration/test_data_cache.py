"""The prepared-data cache shared by real Ray workers of one node: concurrent first loads build
one cache folder, every worker maps the same files, and its CPU splits read rows from that
mapping instead of holding a copy of their own."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_ray_workers_share_one_cache_folder(ray_local, tmp_path) -> None:
    ray = ray_local

    @ray.remote(num_cpus=0.5)
    def load(cfg: dict) -> tuple[str, int, float, set[str]]:
        import os

        import numpy as np
        import torch

        from semiseg.data import load_dataset
        from semiseg.data.sampling import split_tensors
        from semiseg.data.splits import make_split
        from semiseg.data_config import DataConfig

        data = load_dataset(DataConfig(**cfg))
        tensors = split_tensors(data, make_split(data, DataConfig(**cfg), seed=0), torch.device("cpu"))
        sources = {str(part.images.source.filename) for part in (tensors.labeled, tensors.unlabeled,
                                                                  tensors.val, tensors.test)}
        return str(data.images.filename), os.getpid(), float(np.asarray(data.images, np.float64).sum()), sources

    cfg = {"num_images": 60, "image_size": 48, "native_size": 96, "cache_dir": str(tmp_path / "cache")}
    results = ray.get([load.remote(cfg) for _ in range(4)])
    assert len({pid for _, pid, _, _ in results}) >= 2  # really several processes
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and not any(".tmp-" in p.name for p in folders)
    assert {path for path, _, _, _ in results} == {str(folders[0] / "images.npy")}
    assert len({total for _, _, total, _ in results}) == 1
    # every split of every worker gathers from the one shared file (GatheredRows.source)
    assert all(sources == {str(folders[0] / "images.npy")} for *_, sources in results)
