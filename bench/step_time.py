"""Training-step time of every registered method relative to `supervised`, measured side by
side in one process: methods are interleaved round by round so machine noise hits all alike.

    python bench/step_time.py                       # CPU, quickstart sizes
    python bench/step_time.py --device cuda --batch-size 16 --image-size 256

Prints a Markdown table (median ms/step and the ratio to supervised) and the command line.
bench/device_check.py (P1, P4, P6) reuses `build`, `warm_up`, `time_steps` and `interleave`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

import torch

from semiseg.config import load_config
from semiseg.data import SegData, load_dataset
from semiseg.data.splits import Split, make_split
from semiseg.engine import Trainer, build_trainer
from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.methods import METHODS, PseudoLabelStage, TrainStage
from semiseg.models import create_model
from semiseg.pseudo_quality import PseudoLabelScore
from semiseg.sam.store import PseudoLabelStore

_DATASETS: dict[tuple[str, ...], tuple[SegData, Split, str]] = {}


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
            "data.label_fraction=0.05", f"data.num_images={args.num_images}"]


def dataset(overrides: list[str]) -> tuple[SegData, Split, str]:
    """The dataset, its split and a pseudo-label manifest, made once per process and size."""
    key = tuple(overrides)
    if key not in _DATASETS:
        cfg = load_config(None, overrides)
        data = load_dataset(cfg.data)
        split = make_split(data, cfg.data, 0)
        _DATASETS[key] = data, split, pseudo_manifest(data, split)
    return _DATASETS[key]


def build(method: str, args: argparse.Namespace, device: torch.device, extra: Sequence[str] = (),
          wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Trainer:
    """A Trainer for `method` at the bench sizes; `extra` overrides go on top (e.g. model.* or
    train.compile=true) and `wrap_model` is build_trainer's (e.g. Ray's prepare_model)."""
    overrides = base_overrides(args)
    data, split, manifest = dataset(overrides)
    cfg = load_config(None, [*overrides, *extra, f"method.name={method}"])
    inputs = stage_inputs(cfg, data, manifest)
    if inputs:
        cfg = load_config(None, [*overrides, *extra, f"method.name={method}", *inputs])
    return build_trainer(cfg, data, split, device, wrap_model=wrap_model)


def stage_inputs(cfg, data: SegData, manifest: str) -> list[str]:
    """Overrides for what a multi-stage method's last stage reads from earlier stages, as
    stand-ins: a manifest of the true masks for a PseudoLabelStage, a fresh U-Net of this config
    for a TrainStage. A step's time does not depend on their values."""
    stages = METHODS.get(cfg.method.name).stages(cfg)
    kinds = {stage.name: type(stage) for stage in stages}
    out = []
    for param, source in stages[-1].inputs.items():
        if kinds[source] is PseudoLabelStage:
            out.append(f"method.params.{param}={manifest}")
        elif kinds[source] is TrainStage:
            out.append(f"method.params.{param}={fresh_checkpoint(cfg, data)}")
        else:
            raise TypeError(f"{cfg.method.name}: no bench stand-in for a {kinds[source].__name__}")
    return out


def fresh_checkpoint(cfg, data: SegData) -> str:
    """A checkpoint folder holding an untrained U-Net of `cfg.model` as its `best_model`."""
    model = create_model(cfg.model.name, data.in_channels, data.num_classes,
                         cfg.model.base_channels, cfg.model.depth)
    folder = tempfile.mkdtemp(prefix="semiseg-bench-init-")
    torch.save({"best_model": model.state_dict()}, f"{folder}/{CHECKPOINT_FILE}")
    return folder


def pseudo_manifest(data, split) -> str:
    """A method trained on fixed pseudo-labels: their values do not change its step time."""
    store = PseudoLabelStore(tempfile.mkdtemp(prefix="semiseg-bench-"), data.classes)
    for index in split.unlabeled:
        store.write(index, data.ids[index], data.masks[index], {})
    return str(store.write_manifest())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(trainer: Trainer, steps: int, start: int, device: torch.device) -> float:
    """Seconds per training step over `steps` steps from step number `start`."""
    score = PseudoLabelScore(len(trainer.classes))
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(start + i, score)
    sync(device)
    return (time.perf_counter() - t0) / steps


def warm_up(trainer: Trainer, steps: int, device: torch.device) -> None:
    """Past every ramp-up and first pseudo-label refresh (step numbers from 1000 on)."""
    for epoch in range(5):
        trainer.method.on_epoch_start(epoch)
    time_steps(trainer, steps, 1000, device)


def interleave(trainers: dict[str, Trainer], rounds: int, steps: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each trainer, `rounds` samples each, taken round by round."""
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(rounds):
        for name, trainer in trainers.items():
            samples[name].append(time_steps(trainer, steps, 2000 + r * steps, device))
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-images", type=int, default=120)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainers = {m: build(m, args, device) for m in METHODS.names()}
    for t in trainers.values():
        warm_up(t, 3, device)
    samples = interleave(trainers, args.rounds, args.steps, device)
    base = statistics.median(samples["supervised"])
    print(f"| method | ms/step (median of {args.rounds} x {args.steps} steps) | ÷ supervised |")
    print("|---|---|---|")
    for m, s in samples.items():
        print(f"| {m} | {1000 * statistics.median(s):.1f} | {statistics.median(s) / base:.2f} |")
    print(f"\ncommand: python {' '.join(sys.argv)}  (device {device}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
