"""`semiseg pseudolabel`: SAM-refined pseudo-labels for a dataset's unlabeled split, as a Ray Data
pipeline (Keuth et al. 2024, steps 1-3):

    indices -> read + preprocess (CPU) -> coarse U-Net, prompts, SAM (GPU actors) -> write (CPU)

Actors take `sam.gpus_per_actor` GPUs and fractional CPUs (`sam.cpus_per_actor`), so that every
stage fits at once on a 2-CPU machine (whole-CPU actors there deadlock). Each image's mask and
manifest row are written atomically; a rerun skips images already done, so an interrupted run
resumes without partial files. The manifest is assembled at the end from the rows.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from semiseg.config import Config, DataConfig, ModelConfig
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.distributed.cluster import connect
from semiseg.errors import SemisegError
from semiseg.sam.coarse import checkpoint_file, load_coarse_model, predict_labels
from semiseg.sam.config import SamConfig
from semiseg.sam.models import build_sam, mobilesam_checkpoint, sha256
from semiseg.sam.refiner import SamRefiner, to_uint8_rgb
from semiseg.sam.store import PseudoLabelStore

Batch = dict[str, np.ndarray]


@dataclass
class PseudoLabelOutcome:
    manifest: Path
    refined: int   # images refined by this call
    skipped: int   # images a previous run had already done
    seconds: float


def _device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


class ReadImages:
    """CPU stage: loads the dataset once per actor and hands out images by index; the hidden
    mask travels along only to score Dice before/after at the write stage, never into a model."""

    def __init__(self, data_cfg: dict[str, Any]) -> None:
        self.data = load_dataset(DataConfig(**data_cfg))

    def __call__(self, batch: Batch) -> Batch:
        index = batch["index"].astype(np.int64)
        images = self.data.images[index]
        return {"index": index, "image": images, "truth": self.data.masks[index].astype(np.uint8),
                "rgb": np.stack([to_uint8_rgb(im) for im in images])}


class SamStage:
    """Steps 2-3: prompts from the coarse maps, SAM refines them (encoder batched over images)."""

    def __init__(self, sam_cfg: dict[str, Any], checkpoint: str, num_classes: int) -> None:
        self.cfg = SamConfig(**sam_cfg)
        self.device = _device(self.cfg.gpus_per_actor)
        self.refiner = SamRefiner(build_sam(self.cfg.model_type, checkpoint), self.device, self.cfg.two_stage,
                                  encoder_batch=self.cfg.batch_size)
        self.num_classes = num_classes

    def __call__(self, batch: Batch) -> Batch:
        refined = self.refiner.refine(list(batch.pop("rgb")), list(batch["coarse"]), self.num_classes,
                                      self.cfg.components, self.cfg.min_component_size)
        batch["refined"] = np.stack([r.labels for r in refined])
        scores = np.full((len(refined), self.num_classes), np.nan, dtype=np.float32)
        for i, r in enumerate(refined):
            for class_id, score in r.class_scores.items():
                scores[i, class_id] = score
        batch["scores"] = scores
        return batch


class CoarseSamStage(SamStage):
    """Steps 1-3 in one actor: the U-Net trained on the labeled images predicts coarse maps, then
    SAM refines them. One stage, so a batch never leaves the GPU between the two models and each
    actor start-up (a process importing torch and loading weights) happens once, not twice."""

    def __init__(self, checkpoint: str, model_cfg: dict[str, Any], sam_cfg: dict[str, Any],
                 sam_checkpoint: str, num_classes: int) -> None:
        super().__init__(sam_cfg, sam_checkpoint, num_classes)
        self.model = load_coarse_model(checkpoint, ModelConfig(**model_cfg), num_classes, self.device)

    def __call__(self, batch: Batch) -> Batch:
        batch["coarse"] = predict_labels(self.model, batch.pop("image"), self.device)
        return super().__call__(batch)


def write_batch(batch: Batch, root: str, classes: list[str], ids: list[str]) -> Batch:
    """CPU stage: mask PNG then row JSON per image, each atomically."""
    store = PseudoLabelStore(root, classes)
    for i, index in enumerate(batch["index"].tolist()):
        scores = {c: float(s) for c, s in enumerate(batch["scores"][i]) if not np.isnan(s)}
        store.write(index, ids[index], batch["refined"][i], scores, batch["coarse"][i], batch["truth"][i])
    return {"index": batch["index"]}


def sam_checkpoint(cfg: SamConfig) -> str:
    """Resolve the SAM weights in the driver (fetching MobileSAM once, not once per actor) and
    load them once here, so a missing or mismatched file fails before any actor starts."""
    path = cfg.checkpoint or (str(mobilesam_checkpoint()) if cfg.model_type == "vit_t" else "")
    build_sam(cfg.model_type, path)
    return path


def run_pseudolabel(cfg: Config, coarse_checkpoint: str = "", output: str = "",
                    stream: Any = None) -> PseudoLabelOutcome:
    """Refine pseudo-labels for the unlabeled split of `cfg` (data, label fraction, seed)."""
    start, stream = time.time(), stream or sys.stderr
    coarse = str(checkpoint_file(coarse_checkpoint or cfg.sam.coarse_checkpoint or _missing()))
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    load_coarse_model(coarse, cfg.model, data.num_classes)  # a wrong model fails here, clearly
    sam_path = sam_checkpoint(cfg.sam)
    store = PseudoLabelStore(output or cfg.sam.output, data.classes)
    store.claim({"data": cfg.to_dict()["data"], "seed": cfg.train.seed, "sam": cfg.sam.identity(),
                 "coarse_sha256": sha256(Path(coarse))})
    store.remove_stale_temp_files()
    done = store.done()
    todo = [i for i in split.unlabeled if i not in done]
    print(f"pseudolabel: {len(todo)} of {len(split.unlabeled)} unlabeled images to refine "
          f"(SAM {cfg.sam.model_type}) into {store.root}", file=stream, flush=True)
    if todo:
        connect(cfg.ray.address)
        _run_pipeline(cfg, todo, coarse, sam_path, store, data.classes, data.ids, stream)
    manifest = store.write_manifest()
    return PseudoLabelOutcome(manifest, len(todo), len(split.unlabeled) - len(todo), time.time() - start)


def _missing() -> str:
    raise SemisegError("no coarse model: set sam.coarse_checkpoint (a checkpoint.pt, its folder, "
                       "or an MLflow run id) or pass --checkpoint")


def _run_pipeline(cfg: Config, todo: list[int], coarse: str, sam_path: str, store: PseudoLabelStore,
                  classes: list[str], ids: list[str], stream: Any) -> None:
    sam = cfg.sam
    actor = {"concurrency": sam.num_actors, "num_gpus": sam.gpus_per_actor, "num_cpus": sam.cpus_per_actor,
             "batch_size": sam.batch_size}
    ds = ray.data.from_items([{"index": i} for i in todo])
    ds = ds.map_batches(ReadImages, fn_constructor_kwargs={"data_cfg": cfg.to_dict()["data"]},
                        concurrency=1, num_cpus=sam.cpus_per_actor, batch_size=sam.batch_size)
    ds = ds.map_batches(CoarseSamStage, fn_constructor_kwargs={
        "checkpoint": coarse, "model_cfg": cfg.to_dict()["model"], "sam_cfg": cfg.to_dict()["sam"],
        "sam_checkpoint": sam_path, "num_classes": len(classes)}, **actor)
    ds = ds.map_batches(write_batch, fn_kwargs={"root": str(store.root), "classes": classes, "ids": ids},
                        num_cpus=sam.cpus_per_actor, batch_size=sam.batch_size)
    written, begin = 0, time.time()
    for batch in ds.iter_batches(batch_size=None):
        written += len(batch["index"])
        rate = written / max(time.time() - begin, 1e-9)
        print(f"pseudolabel: {written}/{len(todo)} images ({rate:.1f} img/s)", file=stream, flush=True)
