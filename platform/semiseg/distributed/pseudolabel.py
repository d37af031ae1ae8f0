"""`semiseg pseudolabel`: SAM-refined pseudo-labels for a dataset's unlabeled split, as a Ray Data
pipeline (Keuth et al. 2024, steps 1-3):

    indices -> read + preprocess (CPU) -> coarse U-Net, prompts, SAM (GPU actors) -> write (CPU)

SAM refines each image at its source resolution (semiseg.sam.native: the coarse mask upsampled
to it, the result brought back to the training size), and the manifest records both sizes.

With the quality gate (`sam.gate`, the default; semiseg.sam.gate), the driver first refines the
coarse masks of the val images (in its own process, on its GPU if it has one: the val split is
small) and decides per class whether SAM raises val Dice; the decision is written to
gate/gate.json before any unlabeled image, and the unlabeled actors then use SAM's mask only for
those classes and only where its predicted IoU and agreement with the coarse mask pass.

Actors take `sam.gpus_per_actor` GPUs and fractional CPUs (`sam.cpus_per_actor`), so that every
stage fits at once on a 2-CPU machine (whole-CPU actors there deadlock). Each image's mask and
manifest row are written atomically; a rerun reuses the gate decision and skips images already
done, so an interrupted run resumes without partial files and gates every image alike. The
manifest is assembled at the end from the rows.
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
from semiseg.data import SegData, load_dataset
from semiseg.data.splits import Split, make_split
from semiseg.distributed.cluster import connect
from semiseg.errors import SemisegError
from semiseg.sam.coarse import checkpoint_file, load_coarse_model, predict_labels
from semiseg.sam.config import SamConfig
from semiseg.sam.gate import GateDecision, agreement, combine, decide, sam_classes
from semiseg.sam.models import build_sam, mobilesam_checkpoint, sha256
from semiseg.sam.native import native_pair, to_native, to_training
from semiseg.sam.refiner import SamRefiner, to_uint8_rgb
from semiseg.sam.store import PseudoLabelStore

Batch = dict[str, np.ndarray]


@dataclass
class PseudoLabelOutcome:
    manifest: Path
    refined: int   # images refined by this call
    skipped: int   # images a previous run had already done
    seconds: float
    gate: GateDecision | None = None  # None with sam.gate=false


def _device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays that may differ in shape (images of mixed native sizes)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def read_batch(data: SegData, index: np.ndarray, native: bool = True) -> Batch:
    """The training-size images (for the coarse model), their masks (to score only) and the
    8-bit RGB SAM refines: at source resolution when `native`, else the training images."""
    images = data.images[index]
    sources = [native_pair(data, int(i))[0] for i in index] if native else list(images)
    return {"index": index, "image": images, "truth": data.masks[index].astype(np.uint8),
            "rgb": _objects([to_uint8_rgb(im) for im in sources])}


class ReadImages:
    """CPU stage: loads the dataset once per actor and hands out images by index; the hidden
    mask travels along only to score Dice before/after at the write stage, never into a model."""

    def __init__(self, data_cfg: dict[str, Any], native: bool = True) -> None:
        self.data = load_dataset(DataConfig(**data_cfg))
        self.native = native

    def __call__(self, batch: Batch) -> Batch:
        return read_batch(self.data, batch["index"].astype(np.int64), self.native)


class SamStage:
    """Steps 2-3: prompts from the coarse maps (training size, upsampled to each image's own
    size), SAM refines them (encoder batched over images), the result back at training size.

    `use_sam`: the classes the gate lets SAM refine (per image also subject to its thresholds);
    None keeps every refined mask (gate off, and the gate's own val pass)."""

    def __init__(self, sam_cfg: dict[str, Any], checkpoint: str, num_classes: int,
                 use_sam: list[int] | None = None) -> None:
        self.cfg = SamConfig(**sam_cfg)
        self.device = _device(self.cfg.gpus_per_actor)
        self.refiner = SamRefiner(build_sam(self.cfg.model_type, checkpoint), self.device, self.cfg.two_stage,
                                  encoder_batch=self.cfg.batch_size)
        self.num_classes = num_classes
        self.use_sam = use_sam

    def __call__(self, batch: Batch) -> Batch:
        k = self.num_classes
        rgb, coarse = list(batch.pop("rgb")), np.asarray(batch["coarse"])
        prompt_maps = [to_native(c, im.shape[:2], k, self.cfg.min_component_size) for c, im in zip(coarse, rgb)]
        # min_size=1: small components were cleared at training size, where the setting counts
        refined = self.refiner.refine(rgb, prompt_maps, k, self.cfg.components, 1)
        sam = np.stack([to_training(r.labels, coarse.shape[1:]) for r in refined])
        scores = np.full((len(refined), k), np.nan, dtype=np.float32)
        for i, r in enumerate(refined):
            for class_id, score in r.class_scores.items():
                scores[i, class_id] = score
        agree = np.stack([agreement(s, c, k) for s, c in zip(sam, coarse)])
        used = np.zeros((len(sam), k), dtype=bool)
        for i in range(len(sam)):
            used[i, self._used(scores[i], agree[i])] = True
        batch["refined"] = sam if self.use_sam is None else np.stack(
            [combine(c, s, np.flatnonzero(u), k) for c, s, u in zip(coarse, sam, used)])
        batch.update(sam=sam, scores=scores, agreement=agree, used=used,
                     native_shape=np.array([im.shape[:2] for im in rgb], dtype=np.int64))
        return batch

    def _used(self, scores: np.ndarray, agree: np.ndarray) -> list[int]:
        if self.use_sam is None:
            return list(range(1, self.num_classes))
        return sam_classes(scores, agree, self.use_sam, self.cfg.gate_min_score, self.cfg.gate_min_agreement)


class CoarseSamStage(SamStage):
    """Steps 1-3 in one actor: the U-Net trained on the labeled images predicts coarse maps, then
    SAM refines them. One stage, so a batch never leaves the GPU between the two models and each
    actor start-up (a process importing torch and loading weights) happens once, not twice."""

    def __init__(self, checkpoint: str, model_cfg: dict[str, Any], sam_cfg: dict[str, Any],
                 sam_checkpoint: str, num_classes: int, use_sam: list[int] | None = None) -> None:
        super().__init__(sam_cfg, sam_checkpoint, num_classes, use_sam)
        self.model = load_coarse_model(checkpoint, ModelConfig(**model_cfg), num_classes, self.device)

    def __call__(self, batch: Batch) -> Batch:
        batch["coarse"] = predict_labels(self.model, batch.pop("image"), self.device)
        return super().__call__(batch)


def write_batch(batch: Batch, root: str, classes: list[str], ids: list[str]) -> Batch:
    """CPU stage: mask PNG then row JSON per image, each atomically."""
    store = PseudoLabelStore(root, classes)
    for i, index in enumerate(batch["index"].tolist()):
        scores = {c: float(s) for c, s in enumerate(batch["scores"][i]) if not np.isnan(s)}
        store.write(index, ids[index], batch["refined"][i], scores, batch["coarse"][i], batch["truth"][i],
                    sam=batch["sam"][i], agreement=batch["agreement"][i],
                    used=np.flatnonzero(batch["used"][i]).tolist(),
                    native_shape=tuple(int(v) for v in batch["native_shape"][i]))
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
    if data.in_channels != 1:  # SAM sees one grey image as RGB; which channel is not ours to pick
        raise SemisegError(f"{data.source} dataset has {data.in_channels} input channels "
                           f"({', '.join(data.channel_names or [])}); SAM pseudo-labels "
                           "(the SAM pseudo-label stage, semiseg pseudolabel) need single-channel images")
    split = make_split(data, cfg.data, cfg.train.seed)
    load_coarse_model(coarse, cfg.model, data.num_classes)  # a wrong model fails here, clearly
    sam_path = sam_checkpoint(cfg.sam)
    store = PseudoLabelStore(output or cfg.sam.output, data.classes)
    store.claim({"data": cfg.data.identity(), "seed": cfg.train.seed, "sam": cfg.sam.identity(),
                 "coarse_sha256": sha256(Path(coarse))})
    store.remove_stale_temp_files()
    done = store.done()
    todo = [i for i in split.unlabeled if i not in done]
    gate = store.read_gate()
    if cfg.sam.gate and gate is None and todo:
        gate = gate_on_val(cfg, data, split, coarse, sam_path, store, stream)
    if gate is not None:
        print(f"pseudolabel: gate (val, {gate.val_images} images):\n{gate.table()}", file=stream, flush=True)
    print(f"pseudolabel: {len(todo)} of {len(split.unlabeled)} unlabeled images to refine "
          f"(SAM {cfg.sam.model_type}) into {store.root}", file=stream, flush=True)
    if todo:
        connect(cfg.ray.address)
        use_sam = gate.accepted() if gate is not None else None
        _run_pipeline(cfg, todo, coarse, sam_path, use_sam, store, data.classes, data.ids, stream)
    manifest = store.write_manifest()
    return PseudoLabelOutcome(manifest, len(todo), len(split.unlabeled) - len(todo), time.time() - start, gate)


def gate_on_val(cfg: Config, data: SegData, split: Split, coarse: str, sam_path: str,
                store: PseudoLabelStore, stream: Any) -> GateDecision:
    """Refine the coarse masks of the val images here, in the driver, decide the gate from their
    masks (semiseg.sam.gate.decide) and record the decision before any unlabeled image."""
    print(f"pseudolabel: gate: refining {len(split.val)} val images", file=stream, flush=True)
    stage = CoarseSamStage(coarse, cfg.to_dict()["model"], cfg.to_dict()["sam"], sam_path, data.num_classes)
    val, size = np.asarray(split.val, dtype=np.int64), cfg.sam.batch_size
    outs = [stage(read_batch(data, val[i:i + size], cfg.sam.native_resolution)) for i in range(0, len(val), size)]

    def column(key: str) -> list[np.ndarray]:
        return [row for out in outs for row in out[key]]

    scores = np.array(column("scores")).reshape(-1, data.num_classes)
    decision = decide(column("coarse"), column("sam"), scores, column("truth"), data.classes,
                      cfg.sam.gate_min_score, cfg.sam.gate_min_agreement)
    store.write_gate(decision)
    return decision


def _missing() -> str:
    raise SemisegError("no coarse model: set sam.coarse_checkpoint (a checkpoint.pt, its folder, "
                       "or an MLflow run id) or pass --checkpoint")


def _run_pipeline(cfg: Config, todo: list[int], coarse: str, sam_path: str, use_sam: list[int] | None,
                  store: PseudoLabelStore, classes: list[str], ids: list[str], stream: Any) -> None:
    sam = cfg.sam
    actor = {"concurrency": sam.num_actors, "num_gpus": sam.gpus_per_actor, "num_cpus": sam.cpus_per_actor,
             "batch_size": sam.batch_size}
    ds = ray.data.from_items([{"index": i} for i in todo])
    ds = ds.map_batches(ReadImages, fn_constructor_kwargs={"data_cfg": cfg.to_dict()["data"],
                                                           "native": sam.native_resolution},
                        concurrency=1, num_cpus=sam.cpus_per_actor, batch_size=sam.batch_size)
    ds = ds.map_batches(CoarseSamStage, fn_constructor_kwargs={
        "checkpoint": coarse, "model_cfg": cfg.to_dict()["model"], "sam_cfg": cfg.to_dict()["sam"],
        "sam_checkpoint": sam_path, "num_classes": len(classes), "use_sam": use_sam}, **actor)
    ds = ds.map_batches(write_batch, fn_kwargs={"root": str(store.root), "classes": classes, "ids": ids},
                        num_cpus=sam.cpus_per_actor, batch_size=sam.batch_size)
    written, begin = 0, time.time()
    for batch in ds.iter_batches(batch_size=None):
        written += len(batch["index"])
        rate = written / max(time.time() - begin, 1e-9)
        print(f"pseudolabel: {written}/{len(todo)} images ({rate:.1f} img/s)", file=stream, flush=True)
