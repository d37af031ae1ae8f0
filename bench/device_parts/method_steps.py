"""P4: each method's training-step time ÷ supervised's, interleaved round by round in one
process (bench/step_time.py's functions, at the device check's sizes)."""

from __future__ import annotations

from typing import Any

import torch

import step_time
from device_parts.sizes import Sizes, median
from semiseg.methods import METHODS


def run(sizes: Sizes, device: torch.device, threads: int) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainers = {m: step_time.build(m, sizes.step_args(), device, sizes.model)
                    for m in METHODS.names()}
        for trainer in trainers.values():
            step_time.warm_up(trainer, sizes.warmup_steps, device)
        samples = step_time.interleave(trainers, sizes.rounds, sizes.steps, device)
    finally:
        torch.set_num_threads(before)
    base = median(samples["supervised"])
    rows = {m: {"ms_per_step": 1000 * median(s), "ratio": median(s) / base} for m, s in samples.items()}
    return {"methods": rows, "targets": "<= 1.3 (reference_guided <= 1.5)", "threads": threads}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["| method | ms/step | ÷ supervised |", "|---|---|---|"]
    for method, row in result["methods"].items():
        lines.append(f"| {method} | {row['ms_per_step']:.1f} | {row['ratio']:.2f} |")
    return lines
