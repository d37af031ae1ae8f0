"""P1: each method's training img/s inside a one-worker Ray TorchTrainer ÷ the same loop in
plain torch, on the same device, interleaved round by round.

Both sides build the same trainers (bench/step_time.build) and time the same steps. The Ray side
runs as semiseg's Train worker does (semiseg.distributed.train.train_loop_per_worker): torch
threads = the worker's CPUs, the model through `ray.train.torch.prepare_model`, the device from
`ray.train.torch.get_device`. The plain side runs in the driver with the same thread count, so
the ratio is Ray's own cost. One TorchTrainer serves every round: its worker waits for a go
file per round while the driver times the plain side, and the side that goes first alternates.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

import step_time
from device_parts.sizes import Sizes, median
from semiseg.methods import METHODS

WAIT_S = 300.0


def _wait_for(path: Path, stopped: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if stopped():
            raise RuntimeError(f"the other side stopped before writing {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} after {WAIT_S:.0f} s")
        time.sleep(0.01)


def _trainers(sizes: Sizes, device: torch.device, wrap=None) -> dict[str, Any]:
    trainers = {m: step_time.build(m, sizes.step_args(), device, sizes.model, wrap)
                for m in METHODS.names()}
    for trainer in trainers.values():
        step_time.warm_up(trainer, sizes.warmup_steps, device)
    return trainers


def _round(trainers: dict[str, Any], sizes: Sizes, r: int, device: torch.device,
           samples: dict[str, list[float]]) -> None:
    for name, trainer in trainers.items():
        samples[name].append(step_time.time_steps(trainer, sizes.steps, 2000 + r * sizes.steps, device))


def worker_loop(config: dict[str, Any]) -> None:
    """The Ray side: train_loop_per_worker of the one TorchTrainer."""
    import ray.train
    import ray.train.torch

    sizes, sync = Sizes(**config["sizes"]), Path(config["sync"])
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    wrap = lambda model: ray.train.torch.prepare_model(model, move_to_device=device)  # noqa: E731
    trainers = _trainers(sizes, device, wrap)
    (sync / "ready").touch()
    samples: dict[str, list[float]] = {m: [] for m in trainers}
    for r in range(sizes.rounds):
        _wait_for(sync / f"go-{r}", (sync / "plain-failed").exists)
        _round(trainers, sizes, r, device, samples)
        (sync / f"done-{r}").touch()
    (sync / "ray.json").write_text(json.dumps({"samples": samples, "device": str(device)}))
    ray.train.report({"rounds": sizes.rounds})


def _plain_side(sizes: Sizes, device: torch.device, sync: Path, abort: threading.Event,
                out: dict[str, Any]) -> None:
    """The driver's side: the same trainers and rounds, alternating who goes first."""
    try:
        trainers = _trainers(sizes, device)
        samples: dict[str, list[float]] = {m: [] for m in trainers}
        _wait_for(sync / "ready", abort.is_set)
        for r in range(sizes.rounds):
            if r % 2 == 0:
                _round(trainers, sizes, r, device, samples)
            (sync / f"go-{r}").touch()
            _wait_for(sync / f"done-{r}", abort.is_set)
            if r % 2 == 1:
                _round(trainers, sizes, r, device, samples)
        out["samples"] = samples
    except BaseException as exc:  # handed to the main thread; the worker stops waiting
        (sync / "plain-failed").touch()
        out["error"] = exc


def run(sizes: Sizes, device: torch.device, storage: Path, threads: int) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    sync = Path(tempfile.mkdtemp(prefix="p1-sync-", dir=storage))
    use_gpu = device.type == "cuda"
    trainer = ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config={"sizes": sizes.to_dict(), "sync": str(sync), "threads": threads},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name="p1", storage_path=str(storage)),
    )
    before, plain, abort = torch.get_num_threads(), {}, threading.Event()
    torch.set_num_threads(threads)
    side = threading.Thread(target=_plain_side, args=(sizes, device, sync, abort, plain), daemon=True)
    side.start()
    try:
        trainer.fit()
    finally:
        abort.set()
        side.join()
        torch.set_num_threads(before)
    if "error" in plain:
        raise plain["error"]
    ray_side = json.loads((sync / "ray.json").read_text())
    return summarize(plain["samples"], ray_side["samples"], sizes, threads, ray_side["device"])


def summarize(plain: dict[str, list[float]], ray_side: dict[str, list[float]], sizes: Sizes,
              threads: int, worker_device: str) -> dict[str, Any]:
    rows = {}
    for method in plain:
        plain_rate = sizes.batch_size / median(plain[method])
        ray_rate = sizes.batch_size / median(ray_side[method])
        rows[method] = {"plain_img_s": plain_rate, "ray_img_s": ray_rate,
                        "ratio": ray_rate / plain_rate}
    return {"methods": rows, "min_ratio": min(r["ratio"] for r in rows.values()),
            "target": ">= 0.97", "threads": threads, "worker_device": worker_device,
            "note": "img/s counts labeled images per step; median of the rounds"}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["| method | plain img/s | Ray Train img/s | Ray ÷ plain |", "|---|---|---|---|"]
    for method, row in result["methods"].items():
        lines.append(f"| {method} | {row['plain_img_s']:.1f} | {row['ray_img_s']:.1f} | "
                     f"{row['ratio']:.3f} |")
    return lines
