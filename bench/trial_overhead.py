"""Per-trial overhead of the tracked Ray path over a plain `engine.fit()`, on the same trial.

    python bench/trial_overhead.py --repeats 3             # the quickstart's 5 % trial, seed 0
    python bench/trial_overhead.py --quick                 # 3 epochs x 10 steps, fast iterations
    python bench/trial_overhead.py --repeats 3 --tune-arm  # also the trial as a Tune grid of one

Both ways train experiments/quickstart.yaml with data.label_fraction=0.05, train.seed=0 and the
same torch thread count (ray.cpus_per_worker), interleaved: plain, ray, plain, ray, ...
- plain: load_dataset + make_split + engine.build_trainer + engine.fit in this process.
- ray: what `semiseg train` runs (run_sweep of a one-trial grid: a Ray Train TorchTrainer
  started from the driver, per-epoch checkpoints, MLflow in a temporary SQLite store).
- tune arm (--tune-arm; plain, ray, tune, plain, tune, ray, ...): the same trial through a
  one-trial Ray Tune grid, as `semiseg train` ran it before it skipped Tune.

Ray itself starts once, before the first trial, and is reported apart: a sweep pays it once,
not per trial. Every other figure is per trial. The breakdown of a Ray trial comes from
timestamps the trial leaves anyway (MLflow run start/end times, metric timestamps, artifact
files, the LoggedModel, Ray Train's controller log), so it needs no instrumentation in workers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
# Ray's socket paths are capped at ~107 characters: a short RAY_TMPDIR of its own, set before
# Ray is imported, also keeps this bench's Ray processes apart from anyone else's.
RAY_TMP = tempfile.mkdtemp(prefix="rto", dir="/tmp")
os.environ.setdefault("RAY_TMPDIR", RAY_TMP)

import torch  # noqa: E402

from semiseg.config import Config, load_config  # noqa: E402
from semiseg.data import load_dataset  # noqa: E402
from semiseg.data.splits import make_split  # noqa: E402
from semiseg.engine import build_trainer, fit  # noqa: E402

QUICK = ["train.epochs=3", "train.steps_per_epoch=10"]


def trial_config(args: argparse.Namespace, root: Path) -> Config:
    overrides = ["data.label_fraction=0.05", "train.seed=0", "train.device=cpu",
                 f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"ray.storage_path={root / 'ray'}",
                 "ray.address=local", *(QUICK if args.quick else []), *args.overrides]
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", overrides)
    # As `semiseg train` does: a one-trial grid of exactly this config.
    cfg.sweep.methods, cfg.sweep.params = [cfg.method.name], {}
    cfg.sweep.label_fractions, cfg.sweep.seeds = [cfg.data.label_fraction], [cfg.train.seed]
    cfg.sweep.full_supervision = False
    return cfg


class EpochClock:
    """Engine callback: when each epoch (train + val + checkpoint) ended."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.ends.append(time.time())

    def on_fit_end(self, result: object) -> None:
        pass


def run_plain(cfg: Config) -> dict:
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # as the Ray worker does
    t0 = time.time()
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    t_build = time.time()
    trainer = build_trainer(cfg, data, split, torch.device("cpu"))
    t_fit, clock = time.time(), EpochClock()
    with tempfile.TemporaryDirectory() as workdir:
        result = fit(trainer, Path(workdir), [clock])
    t1 = time.time()
    return {"wall": t1 - t0, "load": t_build - t0, "train": t1 - t_build, "fit": t1 - t_fit,
            "epochs": _intervals(t_fit, clock.ends), "test": t1 - clock.ends[-1],
            "dice": result.test_metrics["test/dice_mean"]}


def _intervals(start: float, ends: list[float]) -> list[float]:
    return [b - a for a, b in zip([start, *ends], ends)]


def run_ray(cfg: Config, index: int, via_tune: bool = False) -> dict:
    """`semiseg train`'s run_sweep; via_tune: its lone trial as a one-trial Tuner instead, as
    it ran before it skipped Tune (the --tune-arm comparison)."""
    from semiseg.distributed import tune as sweep

    t0 = time.time()
    direct = sweep._run_trials
    if via_tune:
        sweep._run_trials = sweep._run_tuner  # same arguments; a bench-only switch
    try:
        out = sweep.run_sweep(cfg, f"bench-{index}{'-tune' if via_tune else ''}", force=True)
    finally:
        sweep._run_trials = direct
    t1 = time.time()
    return {"wall": t1 - t0, **_ray_events(out.uri, out.parent_run_id, cfg, t0, t1)}


def _ray_events(uri: str, parent_id: str, cfg: Config, t0: float, t1: float) -> dict:
    """Timestamps the trial left in MLflow (ms clocks of the processes that logged them, all on
    this machine) and in Ray's storage, turned into the stretches of the trial."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    exp = parent.info.experiment_id
    (trial,) = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    rid = trial.info.run_id
    epoch_ts = [m.timestamp / 1000 for m in sorted(client.get_metric_history(rid, "epoch"),
                                                     key=lambda m: m.step)]
    (test,) = client.get_metric_history(rid, "test/dice_mean")
    artifacts = Path(trial.info.artifact_uri.removeprefix("file://"))
    split_logged = (artifacts / "split_summary.json").stat().st_mtime
    test_ts, end_ts = test.timestamp / 1000, trial.info.end_time / 1000
    models = client.search_logged_models([exp], f"source_run_id = '{rid}'")
    model_ts = min((m.creation_timestamp / 1000 for m in models), default=test_ts)
    return {
        "dice": test.value, "epochs_ray": _intervals(split_logged, epoch_ts)[1:],
        "train": test_ts - split_logged,  # build + epochs + test: what plain's "train" does
        "stretches": {
            "driver: checks, parent run, params": parent.info.start_time / 1000 - t0,
            "Tune (or driver) -> trial's MLflow run created": trial.info.start_time / 1000
            - parent.info.start_time / 1000,
            "trial run -> worker has data + split (Train controller, worker group, load)":
                split_logged - trial.info.start_time / 1000,
            "worker: split -> end of epoch 0 (build, epoch 0)": epoch_ts[0] - split_logged,
            "epochs 1.. (train, val, checkpoint, report, MLflow)": epoch_ts[-1] - epoch_ts[0],
            "last epoch -> test metrics logged (test eval)": test_ts - epoch_ts[-1],
            "test -> MLflow PyTorch model created (overlays, torch.export, save_model)":
                model_ts - test_ts,
            "-> trial run ended (model upload, Train shutdown, checkpoint artifact)":
                end_ts - model_ts,
            "trial ended -> run_sweep returned (Tune shutdown, flush, close)": t1 - end_ts,
        },
        "checkpoints": sum(d.is_dir() for d in Path(cfg.ray.storage_path).glob(f"*{rid[:8]}/checkpoint_*")),
        "train_phases": _train_phases(rid[:8], trial.info.start_time / 1000, split_logged),
    }


def _train_phases(run_key: str, trial_start: float, split_logged: float) -> dict[str, float]:
    """The worker-group startup phases Ray Train's controller logs (debug lines of its
    structured log, Ray 2.60), for the Train run of this MLflow run."""
    phases: dict[str, float] = {}
    first = launched = None
    for path in Path(os.environ["RAY_TMPDIR"]).glob("**/logs/train/ray-train-sys-controller-*.log"):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if run_key not in entry.get("run_name", ""):
                continue
            stamp = entry["timestamp_ns"] / 1e9
            first = stamp if first is None else min(first, stamp)
            found = re.match(r"\[Worker Group Initialization\] (.*?) in ([\d.]+)s", entry["message"])
            if found:
                phases[found.group(1)] = float(found.group(2))
                if found.group(1).startswith("Train function launched"):
                    launched = stamp
    if first is not None:
        phases = {"trial run created -> Train controller's first log line": first - trial_start,
                  **phases}
    if launched is not None:
        phases["train fn launched -> data + split logged (imports, load, MLflow)"] = split_logged - launched
    return phases


def overhead_rows(plain: list[dict], ray: list[dict]) -> list[tuple[str, float, float]]:
    """(stretch, ray seconds, ray minus what plain spends on the same work) as medians."""
    med = statistics.median
    p_epoch0 = med(p["epochs"][0] for p in plain)
    p_epoch = med(med(p["epochs"][1:]) for p in plain) if len(plain[0]["epochs"]) > 1 else 0.0
    n_later = len(plain[0]["epochs"]) - 1
    same_work = {
        "trial run -> worker has data + split (Train controller, worker group, load)":
            med(p["load"] for p in plain),
        "worker: split -> end of epoch 0 (build, epoch 0)":
            p_epoch0 + med(p["train"] - p["fit"] for p in plain),
        "epochs 1.. (train, val, checkpoint, report, MLflow)": p_epoch * n_later,
        "last epoch -> test metrics logged (test eval)": med(p["test"] for p in plain),
    }
    rows = []
    for name in ray[0]["stretches"]:
        seconds = med(r["stretches"][name] for r in ray)
        rows.append((name, seconds, seconds - same_work.get(name, 0.0)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1, help="pairs of (plain, ray) trials, interleaved")
    p.add_argument("--quick", action="store_true", help=f"fewer epochs and steps: {' '.join(QUICK)}")
    p.add_argument("--tune-arm", action="store_true",
                   help="also run the trial through a one-trial Ray Tune grid, interleaved")
    p.add_argument("overrides", nargs="*", help="extra dotted key=value overrides")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="semiseg-trial-overhead-"))
    plain: list[dict] = []
    ray_runs: list[dict] = []
    tune_runs: list[dict] = []
    try:
        cfg = trial_config(args, root)
        from semiseg.distributed.cluster import connect

        t0 = time.time()
        connect(cfg.ray.address)
        ray_init = time.time() - t0
        # A store exists after a project's first run: create its tables outside the timings.
        from semiseg import tracking

        tracking.ensure_experiment(tracking.resolve_uri(cfg.tracking.uri), cfg.tracking.experiment)
        print(f"ray.init (once per sweep, not per trial): {ray_init:.1f} s", flush=True)
        for i in range(args.repeats):
            plain.append(run_plain(trial_config(args, root)))
            print(f"plain {i}: {plain[-1]['wall']:.1f} s (fit {plain[-1]['fit']:.1f} s, epoch median "
                  f"{statistics.median(plain[-1]['epochs'][1:] or plain[-1]['epochs']):.2f} s), "
                  f"test dice {plain[-1]['dice']:.4f}", flush=True)
            arms = [("ray", ray_runs, False), ("tune", tune_runs, True)]
            for arm, runs, via_tune in arms[::-1] if i % 2 else arms:  # each goes first in turn
                if via_tune and not args.tune_arm:
                    continue
                runs.append(run_ray(trial_config(args, root), i, via_tune))
                print(f"{arm:5s} {i}: {runs[-1]['wall']:.1f} s (outside build+fit "
                      f"{runs[-1]['wall'] - runs[-1]['train']:.1f} s, epoch median "
                      f"{statistics.median(runs[-1]['epochs_ray']):.2f} s), test dice "
                      f"{runs[-1]['dice']:.4f}", flush=True)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(RAY_TMP, ignore_errors=True)
    return report(plain, ray_runs, ray_init, tune_runs)


def report(plain: list[dict], ray_runs: list[dict], ray_init: float, tune_runs: list[dict]) -> int:
    med = statistics.median
    p_wall, r_wall = med(p["wall"] for p in plain), med(r["wall"] for r in ray_runs)
    print(f"\ncommand: python bench/trial_overhead.py {' '.join(sys.argv[1:])}  "
          f"(torch {torch.__version__}, {os.cpu_count()} CPUs, medians of {len(plain)})")
    print("\n| per trial | seconds |\n|---|---|")
    print(f"| plain: load + split + build + engine.fit | {p_wall:.1f} |")
    print(f"| plain: engine.fit alone | {med(p['fit'] for p in plain):.1f} |")
    for arm, runs in (("ray: `semiseg train` trial (Ray already up)", ray_runs),
                      ("tune arm: the same trial as a one-trial Tune grid", tune_runs)):
        if not runs:
            continue
        wall = med(r["wall"] for r in runs)
        # Without the training itself, whose noise on a shared box is larger than the
        # overhead: the time outside build+epochs+test, minus plain's load + split.
        fixed = med(r["wall"] - r["train"] for r in runs) - med(p["load"] for p in plain)
        print(f"| {arm} | {wall:.1f} |")
        print(f"| ... fixed overhead: wall - plain wall | {wall - p_wall:.1f} |")
        print(f"| ... fixed overhead, training excluded (outside build+fit, - plain load) | {fixed:.1f} |")
        print(f"| ... whole-trial ratio plain / this | {p_wall / wall:.2f} |")
    print(f"| ray.init, once per sweep (not in the above) | {ray_init:.1f} |")
    print(f"| ratio with ray.init (a one-trial `semiseg train`) | {p_wall / (r_wall + ray_init):.2f} |")
    print(f"\nepoch seconds, median: plain {med(med(p['epochs'][1:] or p['epochs']) for p in plain):.2f}"
          f", ray {med(med(r['epochs_ray'] or [0.0]) for r in ray_runs):.2f}; "
          f"Ray checkpoints kept: {ray_runs[-1]['checkpoints']}")
    arms = [runs for runs in (ray_runs, tune_runs) if runs]
    columns = ["ray s", "overhead"] + (["tune arm s", "overhead"] if tune_runs else [])
    print(f"\n| stretch of the trial | {' | '.join(columns)} |")
    print("|---|" + "---|" * 2 * len(arms))
    rows = [overhead_rows(plain, runs) for runs in arms]
    for cells in zip(*rows):
        print(f"| {cells[0][0]} | " + " | ".join(f"{c[1]:.1f} | {c[2]:.1f}" for c in cells) + " |")
    print("\n| Ray Train startup, inside 'trial run -> worker has data + split' | seconds |\n|---|---|")
    for name in ray_runs[0]["train_phases"]:
        values = [r["train_phases"][name] for r in ray_runs if name in r["train_phases"]]
        print(f"| {name} | {med(values):.2f} |")
    dice = {round(x["dice"], 6) for x in plain + ray_runs + tune_runs}
    print(f"\ntest dice: plain {[round(p['dice'], 4) for p in plain]}, "
          f"ray {[round(r['dice'], 4) for r in ray_runs + tune_runs]}: "
          f"{'match' if len(dice) == 1 else 'MISMATCH'}")
    return 0 if len(dice) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
