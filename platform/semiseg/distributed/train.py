"""One trial = its method's stages (semiseg.distributed.stages); each TrainStage is one Ray Train
TorchTrainer running `engine.fit` on each worker (DDP across them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchConfig

from semiseg import tracking
from semiseg.config import Config, from_dict
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.distributed.cluster import storage_path
from semiseg.distributed.cost import TrialCost
from semiseg.distributed.selected_model import log_selected_model
from semiseg.distributed.stages import run_stages
from semiseg.distributed.stopped import PLACEMENT_GROUP_KEY, current_placement_group
from semiseg.engine import FitResult, build_trainer, fit
from semiseg.methods import METHODS


class RayReportCallback:
    """Every worker reports each epoch (Ray Train expects all ranks to); rank 0 attaches the
    checkpoint it just wrote, which Ray copies to storage for resumption."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # The placement group id lets the sweep free a trial's CPUs/GPUs that Tune stops (stopped.py).
        ray.train.report({**metrics, PLACEMENT_GROUP_KEY: current_placement_group()}, checkpoint=checkpoint)

    def on_fit_end(self, result: FitResult) -> None:
        pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(config["cfg"], source="trial config")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, cfg.train.seed)
    checkpoint = ray.train.get_checkpoint()  # set when Ray restarted this worker group
    logger = _rank0_logger(config, rank)  # the other ranks only train
    callbacks: list = []
    if logger:
        logger.log_dict(split.manifest(data), "split_manifest.json")
        logger.log_dict(split.summary(data), "split_summary.json")  # each role's position range
        logger.log_dataset(cfg.data.name, cfg.data.root or data.source, cfg.to_dict()["data"],
                           split.manifest(data))  # the Dataset column: train / val / test
        callbacks.append(tracking.MlflowCallback(logger, _logged_epochs(logger, checkpoint),
                                                 system_metrics=cfg.tracking.system_metrics))
    # MLflow before Ray: once Ray holds an epoch's checkpoint, its metrics are logged, so a
    # restart from that checkpoint can never leave the epoch out of the run.
    callbacks.append(RayReportCallback())
    device = _device()

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        wrapped = ray.train.torch.prepare_model(model, move_to_device=device)
        if logger:
            logger.set_tags({
                "ray.world_size": str(ctx.get_world_size()), "ray.device": str(device),
                "model.wrapper": type(wrapped).__name__,
            })
        return wrapped

    workdir = Path(tempfile.mkdtemp(prefix="semiseg-"))
    resume = _restore(checkpoint, workdir)
    try:
        trainer = build_trainer(cfg, data, split, device, wrap_model=wrap, rank=rank)
        fit(trainer, workdir / "latest", callbacks, resume_from=resume)
        log_selected_model(logger, cfg, data, split, [workdir / "latest", resume])  # MLflow model
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _rank0_logger(config: dict[str, Any], rank: int) -> tracking.RunLogger | None:
    """Rank 0 reattaches to the trial's MLflow run (its id is in the train config, so a
    restarted worker logs to the same run) and takes over the spool of the worker before it."""
    if rank != 0 or not config.get("run_id"):
        return None
    return tracking.RunLogger(config["uri"], config["run_id"], Path(config["spool"]))


def _logged_epochs(logger: tracking.RunLogger, checkpoint: ray.train.Checkpoint | None) -> set[int]:
    """Epochs the run already has: after a restart, those between Ray's last registered
    checkpoint and the crash. Ray's controller takes reports at each poll (every 0.5 s, see
    TRAIN_ENV_DEFAULTS), so a worker that dies early restarts from scratch with epochs already
    logged."""
    logged = logger.logged_steps("epoch")
    if checkpoint is not None or logged:
        logger.set_tags({"semiseg.resumed_from": Path(checkpoint.path).name if checkpoint else "scratch"})
    return logged


def _device() -> torch.device:
    """The worker's device; CPU where Ray granted a GPU share but torch sees no CUDA."""
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("a GPU was scheduled for this worker but CUDA is unavailable; using CPU")
        return torch.device("cpu")
    return device


def _restore(checkpoint: ray.train.Checkpoint | None, workdir: Path) -> Path | None:
    """A local copy of the checkpoint Ray restored after a worker failure, if any."""
    if checkpoint is None:
        return None
    target = workdir / "restored"
    with checkpoint.as_directory() as src:
        shutil.copytree(src, target)
    return target


def run_trainer(cfg: Config, run_id: str | None, uri: str, name: str,
                callbacks: list | None = None) -> ray.train.Result:
    """Run one TorchTrainer to completion (raises if it failed); its Result has the last checkpoint."""
    resources = {"CPU": cfg.ray.cpus_per_worker}
    storage = storage_path(cfg.ray.storage_path)
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_id": run_id, "uri": uri,
                           "spool": str(tracking.spool_path(storage, name, "rank0"))},
        torch_config=None if cfg.ray.backend == "auto" else TorchConfig(backend=cfg.ray.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with _train_env():
        return trainer.fit()


# Ray Train settings it reads from the environment of the process that calls fit() and hands on
# to its controller and workers (ray/train/v2/_internal/constants.py, Ray 2.60). A value already
# in the environment wins. The controller polls its workers every 2 s by default, so each fit's
# end waited up to 2 s to be noticed, and each report up to 2 s to be registered; one poll is
# one small actor call (docs/BENCHMARKS.md, P1-cpu).
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@contextlib.contextmanager
def _train_env() -> Iterator[None]:
    added = {k: v for k, v in TRAIN_ENV_DEFAULTS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def run_tracked_trial(cfg: Config, uri: str, experiment_id: str, parent_run_id: str | None,
                      callbacks: list | None = None,
                      on_run: Callable[[str], None] | None = None,
                      stopped: Callable[[], bool] = lambda: False) -> str:
    """Create the trial's MLflow run (handing its id to `on_run`, e.g. to show progress), run
    its method's stages, and close the run as FINISHED or FAILED.

    stopped: True once the scheduler has stopped this trial (ASHA). Its fit then raises from
    the torn-down Tune session, which is no failure: the run is left for the sweep driver to
    close as KILLED (tune.close_open_children), with every epoch it logged."""
    name = trial_name(cfg)
    run_id = tracking.start_run(uri, experiment_id, name, "trial", trial_tags(cfg), parent_run_id)
    if on_run:
        on_run(run_id)
    # One Train run per tracked run: a rerun (--force, or after a deleted run) must start
    # fresh, not restore the checkpoints an earlier trial with this config left in storage.
    train_name = f"{name}-{cfg.config_hash()}-{run_id[:8]}"
    spool = tracking.spool_path(storage_path(cfg.ray.storage_path), train_name, "trial")
    logger = tracking.RunLogger(uri, run_id, spool)
    logger.log_params(cfg.flat())
    try:
        # Only the stage given the run id (the last) reports to Tune and logs to the run.
        cost = TrialCost(cfg)  # reserved CPU/GPU-seconds, for the report's Dice per compute-hour
        result = run_stages(
            cfg, run_id, train_name,
            train=cost.timed(lambda c, rid, name: run_trainer(c, rid, uri, name,
                                                              callbacks if rid else None)),
            log_metrics=logger.log_metrics, log_files=logger.log_files)
        logger.log_metrics(cost.metrics())
        _log_model(logger, result, cfg)
    except BaseException:
        if stopped():
            logger.close()
        else:
            logger.end("FAILED")
        raise
    logger.end("FINISHED")
    return run_id


def _log_model(logger: tracking.RunLogger, result: ray.train.Result, cfg: Config) -> None:
    """The final checkpoint.pt (with the model selected on val) as artifact model/, so a run id
    is enough to reuse the model, e.g. as the coarse model of `semiseg pseudolabel`."""
    checkpoint = result.checkpoint if result is not None else None
    if cfg.tracking.log_model and checkpoint is not None and "://" not in checkpoint.path:
        logger.log_files(Path(checkpoint.path), "model")


def trial_name(cfg: Config) -> str:
    return f"{cfg.method.name}-f{cfg.data.label_fraction:g}-s{cfg.train.seed}"


def trial_tags(cfg: Config) -> dict[str, str]:
    return {
        tracking.CONFIG_HASH_TAG: cfg.config_hash(), "method": cfg.method.name,
        "dataset": cfg.data.name, "label_fraction": f"{cfg.data.label_fraction:g}",
        "seed": str(cfg.train.seed),
        "method.evaluates": METHODS.get(cfg.method.name).evaluates,  # e.g. "teacher"
    }
