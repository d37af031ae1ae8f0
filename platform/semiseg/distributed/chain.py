"""The SAM chain of method `sam_refined` inside one trial (Keuth et al. 2024, the whole loop):

    coarse U-Net on the labeled images (method supervised)
    -> for each round: SAM-refine its masks on the unlabeled images (Ray Data)
                       -> train sam_refined on labeled + refined pseudo-labels
                       (that model is the next round's coarse model)

Only the last training reports to Tune and logs epochs to the trial's MLflow run, so the trial
looks like any other; each round's pseudo-label quality (Dice before/after refinement against
the hidden masks, SAM's predicted IoU) is logged to the same run at step = round, and its
manifest as an artifact. Pseudo-labels live under the Train storage path, so on a multi-node
cluster that path must be shared storage.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from semiseg.config import Config
from semiseg.distributed.cluster import storage_path
from semiseg.distributed.pseudolabel import run_pseudolabel
from semiseg.errors import SemisegError
from semiseg.methods import method_config

Trainer = Callable[[Config, "str | None", str], Any]  # (cfg, run_id or None, train name) -> Result


def run_sam_chain(cfg: Config, run_id: str | None, train_name: str, train: Trainer,
                  log_metrics: Callable[[dict[str, float], int], None],
                  log_files: Callable[[Path, str], None]) -> Any:
    """Run the chain; `train` runs one TorchTrainer, the loggers write to the trial's run."""
    rounds = method_config("sam_refined", cfg.method.params).rounds
    root = Path(storage_path(cfg.ray.storage_path)) / train_name
    local = Path(tempfile.mkdtemp(prefix="semiseg-chain-"))
    try:
        coarse_cfg = copy.deepcopy(cfg)
        coarse_cfg.method.name, coarse_cfg.method.params = "supervised", {}
        coarse = _local_checkpoint(train(coarse_cfg, None, f"{train_name}-coarse"), local / "coarse")
        result = None
        for r in range(rounds):
            outcome = run_pseudolabel(cfg, str(coarse), str(root / f"pseudolabels-round{r}"))
            log_metrics(pseudo_metrics(pd.read_parquet(outcome.manifest)), r)
            log_files(outcome.manifest.parent / "rows", f"pseudolabels/round{r}/rows")
            stage = copy.deepcopy(cfg)
            stage.method.params = {**cfg.method.params, "manifest": str(outcome.manifest)}
            last = r == rounds - 1
            result = train(stage, run_id if last else None, f"{train_name}-round{r}")
            if not last:
                coarse = _local_checkpoint(result, local / f"round{r}")
        return result
    finally:
        shutil.rmtree(local, ignore_errors=True)


def pseudo_metrics(manifest: pd.DataFrame) -> dict[str, float]:
    """Means over images of Dice before/after refinement and of SAM's predicted IoU."""
    keys = [c for c in manifest.columns if c.startswith(("dice_before", "dice_after", "sam_iou/"))]
    return {f"sam/{k}": float(manifest[k].mean()) for k in keys if manifest[k].notna().any()}


def _local_checkpoint(result: Any, target: Path) -> Path:
    """A local copy of the checkpoint a finished TorchTrainer left (storage may be remote)."""
    if result is None or result.checkpoint is None:
        raise SemisegError("the coarse model's training left no checkpoint")
    with result.checkpoint.as_directory() as src:
        shutil.copytree(src, target)
    return target
