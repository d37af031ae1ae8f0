"""The GPU figures of docs/BENCHMARKS.md in one command: writes DIR/device_check.json and
DIR/device_check.md (rewritten after every part, so a run cut short keeps what it measured).

    python bench/device_check.py --out DIR            # one H100/H200: every part, < 8 minutes
    python bench/device_check.py --out DIR --smoke    # toy sizes on the CPU, < 1 minute (CI)

Parts, in the order they run (cheapest first; P6 last, as it compiles longest and a CUDA-graph
fault there cannot poison the CUDA context of a part still to come):
- P4: each method's training step ÷ supervised's (target <= 1.3, reference_guided <= 1.5);
- P2: SAM refinement at 512², encoder batch 32: the naive SamPredictor loop against the
      batched refiner, with the mask IoU between them (target >= 10x at IoU >= 0.99);
- P1: each method's img/s inside a one-worker Ray TorchTrainer ÷ the same loop in plain torch
      on the same device, interleaved (target >= 0.97);
- P3: 8 small trials with 0.125 GPU each under Ray Tune ÷ the same 8 one after another, in
      wall time (target <= 0.5; smoke: 2 trials with 0.5 CPU each);
- P6: eager, channels_last, compile, CUDA graphs and channels_last + CUDA graphs: img/s and
      the loss over the same first steps (target >= 2x eager at the same loss; the CUDA-graph
      variants are skipped, with the reason, off CUDA).
Each part is guarded: one that fails records its error in the JSON and the others still run;
none starts after --budget-s (default 420 s). bench/device_parts/ holds one module per part.

It installs nothing. On a GPU machine without a network, the caller installs the offline
bundles of ../shared/tools/gpu-wheels.sh (MLflow is not needed: nothing here logs to it), plus
nibabel, which semiseg.data imports and the GPU image lacks. Here, from the project root:

    ../shared/tools/gpu-wheels.sh ray sam
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl/nibabel nibabel==5.4.2

What travels to a device call is limited to 64 MiB: Ray (~50 MiB), nibabel (3 MiB) and the two
SAM code wheels fit, but not the 39 MiB MobileSAM checkpoint beside them. So the one call runs
P2 on MobileSAM's architecture with random weights (the same arithmetic, so the same img/s),
with timeout_s 540, carry [".whl/ray", ".whl/nibabel",
".whl/sam/segment_anything-1.0-py3-none-any.whl", ".whl/sam/mobilesam_mirror-1.0.0-py3-none-any.whl"]
and the command:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/ray/*.whl \
      .whl/nibabel/*.whl .whl/sam/*.whl && export PYTHONPATH=/tmp/site:$PWD/platform \
      PYTHONUNBUFFERED=1 && python3 bench/device_check.py --out $OUT --sam-checkpoint random

P2's mask IoU with the official weights (random weights agree less: 0.90 against 0.99 on CPU)
takes a second, short call with carry [".whl/sam", ".whl/nibabel"]: the same install without
.whl/ray, then `python3 bench/device_check.py --out $OUT --parts P2 --sam-checkpoint
.whl/sam/mobile_sam.pt`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # step_time, sam_throughput, device_parts
# Ray workers import the part modules too: semiseg.distributed.cluster passes PYTHONPATH on.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)

import torch  # noqa: E402

from device_parts import method_steps, ray_train, sam, speed_options, tune  # noqa: E402
from device_parts.sizes import FULL, SMOKE, Sizes  # noqa: E402

PARTS = ("P1", "P2", "P3", "P4", "P6")
TITLES = {"P1": "Ray Train ÷ plain torch, img/s per method", "P2": "SAM: batched ÷ naive",
          "P3": "Fractional trials under Ray Tune ÷ sequential, wall time",
          "P4": "Each method's step ÷ supervised's", "P6": "Speed options ÷ eager"}


class RaySession:
    """A local Ray, started by the first part that needs it and shut down at the end."""

    def __init__(self) -> None:
        self.started = False

    def ensure(self) -> None:
        from semiseg.distributed.cluster import connect

        connect("local")
        self.started = True

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def part_runners(args: argparse.Namespace, sizes: Sizes, device: torch.device, storage: Path,
                 ray_session: RaySession) -> dict[str, Callable[[], dict[str, Any]]]:
    def with_ray(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        return lambda: (ray_session.ensure(), fn())[1]

    backend = args.compile_backend or sizes.compile_backend
    # Cheapest first; P6 last: it compiles longest, and a CUDA-graph fault there cannot
    # poison the CUDA context of a part still to come.
    return {
        "P4": lambda: method_steps.run(sizes, device, args.threads),
        "P2": lambda: sam.run(sizes, device, args.sam_checkpoint),
        "P1": with_ray(lambda: ray_train.run(sizes, device, storage, args.threads)),
        "P3": with_ray(lambda: tune.run(sizes, device, storage, args.threads)),
        "P6": lambda: speed_options.run(sizes, device, args.threads, args.p6_methods, backend),
    }


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = {"status": "ok", "result": fn()}
    except Exception as exc:  # recorded; the other parts still run
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:4000],
                  "traceback": traceback.format_exc()[-6000:]}
    result["seconds"] = time.perf_counter() - start
    return result


def describe(device: torch.device, args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return {"command": " ".join(["python", *sys.argv]), "device": str(device), "device_name": name,
            "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "smoke": args.smoke, "sizes": sizes.to_dict(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# Device check: {meta['device_name']} ({meta['device']})", "",
             f"`{meta['command']}`, torch {meta['torch']}, {meta['started']}, "
             f"{report.get('wall_s', 0):.0f} s in all", ""]
    writers = {"P1": ray_train.markdown, "P2": sam.markdown, "P3": tune.markdown,
               "P4": method_steps.markdown, "P6": speed_options.markdown}
    for name in PARTS:
        if name not in report["parts"]:
            continue
        part = report["parts"][name]
        lines += [f"## {name}: {TITLES[name]}", ""]
        if part["status"] == "ok":
            lines += writers[name](part["result"])
        else:
            lines.append(f"**{part['status']}** after {part['seconds']:.0f} s: `{part['error'][:500]}`")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, report: dict[str, Any]) -> None:
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "device_check.md").write_text(markdown(report))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for device_check.json and .md")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, every part")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda if available; smoke: cpu)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs of the Ray worker)")
    p.add_argument("--sam-checkpoint", default="",
                   help="MobileSAM weights for P2; 'random' for its architecture with random weights")
    p.add_argument("--p6-methods", nargs="+", default=["supervised"])
    p.add_argument("--compile-backend", default="", help="P6 (default inductor; smoke: aot_eager)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no part after this many seconds (the others are marked skipped)")
    p.add_argument("--image-size", type=int, help="P1, P4, P6 images (default 128; smoke 32)")
    p.add_argument("--batch-size", type=int, help="P1, P4, P6 batch (default 16; smoke 2)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts {args.parts}: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    for key in ("image_size", "batch_size"):
        if getattr(args, key):
            sizes = dataclasses.replace(sizes, **{key: getattr(args, key)})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": describe(device, args, sizes), "parts": {}}
    start, ray_session = time.perf_counter(), RaySession()
    wanted = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(ray_session.close)
        for name, run in part_runners(args, sizes, device, Path(tmp), ray_session).items():
            if name not in wanted:
                continue
            print(f"{name}: {TITLES[name]} ...", flush=True)
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                report["parts"][name] = {"status": "skipped", "seconds": 0.0, "error": (
                    f"not started: {elapsed:.0f} s had passed, over --budget-s {args.budget_s:.0f}")}
            else:
                report["parts"][name] = guarded(run)
            report["wall_s"] = time.perf_counter() - start
            print(f"{name}: {report['parts'][name]['status']} in {report['parts'][name]['seconds']:.1f} s", flush=True)
            write(args.out, report)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
