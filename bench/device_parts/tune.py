"""P3: N small trials packed onto one device under Ray Tune (a fractional GPU each) ÷ the same N
run one after another, in wall time.

A trial is one plain `engine.fit` (build_trainer + fit; seeds 0..N-1) of a small config, with
no MLflow: this measures how well fractional trials share the device. A `semiseg sweep` trial
adds a TorchTrainer and MLflow around each fit; that fixed cost is P1-cpu's subject. The
sequential side runs the same fits in the driver process, one after another, so it pays no
Ray start-up at all: the ratio is the whole gain a user sees from packing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from device_parts.sizes import Sizes


def fit_once(overrides: list[str], threads: int) -> dict[str, float]:
    """One trial: build and fit a small config; its wall time and test Dice."""
    from semiseg.config import load_config
    from semiseg.data import load_dataset
    from semiseg.data.splits import make_split
    from semiseg.engine import build_trainer, fit, resolve_device

    torch.set_num_threads(threads)
    start = time.perf_counter()
    cfg = load_config(None, overrides)
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    trainer = build_trainer(cfg, data, split, resolve_device("auto"))
    with tempfile.TemporaryDirectory(prefix="p3-") as workdir:
        result = fit(trainer, Path(workdir))
    return {"fit_s": time.perf_counter() - start, "test_dice": result.test_metrics["test/dice_mean"]}


def tune_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable: one fit, reported once."""
    from ray import tune

    tune.report(fit_once(config["overrides"], config["threads"]))


def trial_overrides(sizes: Sizes, seed: int) -> list[str]:
    device = "train.device=auto"
    return [*sizes.trial_overrides, f"train.seed={seed}", device]


def run(sizes: Sizes, device: torch.device, storage: Path, threads: int) -> dict[str, Any]:
    from ray import tune

    trials = [trial_overrides(sizes, seed) for seed in range(sizes.trials)]
    before = torch.get_num_threads()
    start = time.perf_counter()
    sequential = [fit_once(overrides, threads) for overrides in trials]
    sequential_s = time.perf_counter() - start
    torch.set_num_threads(before)
    resources = {"cpu": sizes.trial_cpus}
    if device.type == "cuda":
        resources["gpu"] = sizes.trial_gpus
    tuner = tune.Tuner(
        tune.with_resources(tune_trial, resources),
        param_space={"overrides": tune.grid_search(trials), "threads": threads},
        tune_config=tune.TuneConfig(max_concurrent_trials=sizes.trials),
        run_config=tune.RunConfig(name="p3", storage_path=str(storage), verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    tune_s = time.perf_counter() - start
    errors = [str(r.error) for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(trials)} Tune trials failed; first: {errors[0][-2000:]}")
    packed = [r.metrics for r in results]
    return {"trials": sizes.trials, "resources_per_trial": resources,
            "sequential_s": sequential_s, "tune_s": tune_s, "ratio": tune_s / sequential_s,
            "target": "<= 0.5",
            "sequential_fit_s": [t["fit_s"] for t in sequential],
            "tune_fit_s": sorted(m["fit_s"] for m in packed),
            "test_dice_sequential": [t["test_dice"] for t in sequential],
            "test_dice_tune": sorted(m["test_dice"] for m in packed)}


def markdown(result: dict[str, Any]) -> list[str]:
    return [
        f"{result['trials']} trials, {result['resources_per_trial']} each under Tune",
        "", "| way | wall s | ÷ sequential |", "|---|---|---|",
        f"| one after another (plain fits) | {result['sequential_s']:.1f} | 1.00 |",
        f"| Ray Tune, all at once | {result['tune_s']:.1f} | {result['ratio']:.2f} |",
    ]
