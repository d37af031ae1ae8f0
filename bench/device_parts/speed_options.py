"""P6: the training speed options against eager, per method: img/s of eager, channels_last,
compile, CUDA graphs and channels_last with the best of the others, each with its mean
training loss over the same first N steps.

Every variant is a fresh trainer from the same seed and batches. Its first epoch (N steps, the
compilation included) gives the loss and `first_epoch_s`; then the variants are timed
interleaved round by round (bench/step_time.py's functions). CUDA graphs are skipped, with
the reason, where the device is not CUDA.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import step_time
from device_parts.sizes import Sizes, median


def variants(backend: str, cuda: bool) -> dict[str, list[str]]:
    """Each option alone, then the fastest-looking mix: channels_last with CUDA graphs (on a
    GPU) or with compile (elsewhere)."""
    compile_ = ["train.compile=true", f"train.compile_backend={backend}"]
    graphs = ["train.cuda_graphs=true", "train.compile_backend=inductor"]
    mix = "channels_last+cuda_graphs" if cuda else "channels_last+compile"
    return {
        "eager": [], "channels_last": ["train.channels_last=true"], "compile": compile_,
        "cuda_graphs": graphs, mix: ["train.channels_last=true", *(graphs if cuda else compile_)],
    }


def run_method(method: str, sizes: Sizes, device: torch.device, backend: str) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    trainers = {}
    for name, overrides in variants(backend, device.type == "cuda").items():
        if name == "cuda_graphs" and device.type != "cuda":
            rows[name] = {"skipped": f"CUDA graphs need a CUDA device; this run's is {device.type}"}
            continue
        extra = [*sizes.model, *overrides, f"train.steps_per_epoch={sizes.p6_steps}"]
        trainer = step_time.build(method, sizes.step_args(), device, extra)
        start = time.perf_counter()
        metrics = trainer.run_epoch(0)
        step_time.sync(device)
        rows[name] = {"loss": metrics["train/loss"], "first_epoch_s": time.perf_counter() - start}
        trainers[name] = trainer
    samples = step_time.interleave(trainers, sizes.rounds, sizes.steps, device)
    eager_rate = sizes.batch_size / median(samples["eager"])
    eager_loss = rows["eager"]["loss"]
    for name, s in samples.items():
        rate = sizes.batch_size / median(s)
        rows[name].update(img_s=rate, speedup=rate / eager_rate,
                          loss_rel_diff=abs(rows[name]["loss"] - eager_loss) / abs(eager_loss))
    return rows


def run(sizes: Sizes, device: torch.device, threads: int, methods: list[str],
        backend: str) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_method = {m: run_method(m, sizes, device, backend) for m in methods}
    finally:
        torch.set_num_threads(before)
    return {"methods": per_method, "steps_for_loss": sizes.p6_steps, "compile_backend": backend,
            "target": "best option >= 2x eager img/s at the same loss", "threads": threads}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"loss: mean training loss over the first {result['steps_for_loss']} steps; "
             f"compile backend {result['compile_backend']}", "",
             "| method | variant | img/s | ÷ eager | loss | loss vs eager | first epoch s |",
             "|---|---|---|---|---|---|---|"]
    for method, rows in result["methods"].items():
        for name, row in rows.items():
            if "skipped" in row:
                lines.append(f"| {method} | {name} | skipped: {row['skipped']} | | | | |")
                continue
            lines.append(f"| {method} | {name} | {row['img_s']:.1f} | {row['speedup']:.2f} | "
                         f"{row['loss']:.4f} | {100 * row['loss_rel_diff']:.2f} % | "
                         f"{row['first_epoch_s']:.1f} |")
    return lines
