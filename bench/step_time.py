"""Training-step time of every registered method relative to `supervised`, measured side by
side in one process: methods are interleaved round by round so machine noise hits all alike.

    python bench/step_time.py                       # CPU, quickstart sizes
    python bench/step_time.py --device cuda --batch-size 16 --image-size 256

Prints a Markdown table (median ms/step and the ratio to supervised) and the command line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.engine import Trainer, build_trainer
from semiseg.methods import METHODS
from semiseg.pseudo_quality import PseudoLabelScore
from semiseg.sam.store import PseudoLabelStore


def build(method: str, args: argparse.Namespace, device: torch.device) -> Trainer:
    overrides = [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                 "data.label_fraction=0.05", f"data.num_images={args.num_images}"]
    cfg = load_config(None, overrides)
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, 0)
    extra = [f"method.params.manifest={pseudo_manifest(data, split)}"] if method == "sam_refined" else []
    cfg = load_config(None, [*overrides, f"method.name={method}", *extra])
    return build_trainer(cfg, data, split, device)


def pseudo_manifest(data, split) -> str:
    """sam_refined trains on fixed pseudo-labels; their values do not change its step time."""
    store = PseudoLabelStore(tempfile.mkdtemp(prefix="semiseg-bench-"), data.classes)
    for index in split.unlabeled:
        store.write(index, data.ids[index], data.masks[index], {})
    return str(store.write_manifest())


def time_steps(trainer: Trainer, steps: int, start: int, device: torch.device) -> float:
    score = PseudoLabelScore(len(trainer.classes))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(start + i, score)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


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
    for m, t in trainers.items():  # warm-up: past every ramp-up and first pseudo-label refresh
        for epoch in range(5):
            t.method.on_epoch_start(epoch)
        time_steps(t, 3, 1000, device)
    samples: dict[str, list[float]] = {m: [] for m in trainers}
    for r in range(args.rounds):
        for m, t in trainers.items():
            samples[m].append(time_steps(t, args.steps, 2000 + r * args.steps, device))
    base = statistics.median(samples["supervised"])
    print(f"| method | ms/step (median of {args.rounds} x {args.steps} steps) | ÷ supervised |")
    print("|---|---|---|")
    for m, s in samples.items():
        print(f"| {m} | {1000 * statistics.median(s):.1f} | {statistics.median(s) / base:.2f} |")
    print(f"\ncommand: python {' '.join(sys.argv)}  (device {device}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
