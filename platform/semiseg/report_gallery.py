"""The dashboard's gallery: the same test images for every setting, each row an image, its
ground truth, and each method's prediction at each label fraction, with that prediction's Dice.

Which images: those where the methods differ most (the largest spread of per-image test Dice
between methods at one label fraction; between fractions when there is one method), read off
the trials' test_per_image.json, plus the most typical one (its Dice closest to the median).
Which trial per (method, label fraction): the val-selected method.params at the smallest seed
that every setting ran, so each column saw the same split seed.

The predictions are recomputed from each trial's logged model/checkpoint.pt (the weights it
selected on val, as `semiseg pseudolabel --checkpoint RUN_ID` loads them), on the images of the
dataset rebuilt from the trial's logged `data.*` params: a trial logs overlays of its first
test images only, not the ones chosen here. Each tile's Dice is recomputed with
semiseg.metrics, so it must equal the trial's logged per-image Dice (the dashboard test checks).
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semiseg import paired, tracking
from semiseg.errors import SemisegError

DIFFER, TYPICAL = 3, 1
DPI = 90  # the tiles are 64-256 px images: more dots only add bytes
MAX_DICE_GAP = 0.02  # mean |recomputed - logged| per-image Dice (see check_logged)


@dataclass
class Gallery:
    ids: list[str]
    reasons: list[str]                              # why each image is shown
    images: np.ndarray                              # (N, H, W) or (N, C, H, W)
    masks: np.ndarray                               # (N, H, W)
    preds: dict[tuple[str, float], np.ndarray]      # (method, fraction) -> (N, H, W)
    dice: dict[tuple[str, float], np.ndarray]       # (method, fraction) -> (N,) recomputed
    runs: dict[tuple[str, float], str]              # (method, fraction) -> run id shown


def image_table(chosen: pd.DataFrame, per_image: pd.DataFrame) -> pd.DataFrame:
    """Per test image (rows) and (method, label fraction) (columns): mean per-image Dice over
    seeds; only images that every setting scored."""
    if per_image is None or per_image.empty or paired.IMAGE_KEY not in per_image:
        return pd.DataFrame()
    rows = per_image.merge(chosen[["run_id", "method", "label_fraction"]], on="run_id")
    table = rows.groupby(["id", "method", "label_fraction"])[paired.IMAGE_KEY].mean()
    return table.unstack(["method", "label_fraction"]).dropna().sort_index()


def pick_images(chosen: pd.DataFrame, per_image: pd.DataFrame, differ: int = DIFFER,
                typical: int = TYPICAL) -> list[tuple[str, str]]:
    """(image id, why it is shown): `differ` images where the methods differ most, then
    `typical` images closest to the median Dice; [] without per-image metrics. The fractions
    take turns (the largest spread first), so one failing setting cannot fill every row."""
    table = image_table(chosen, per_image)
    if table.empty:
        return []
    if table.columns.get_level_values("method").nunique() > 1:  # best method minus worst
        by_fraction = table.T.groupby(level="label_fraction")
        spread, what = (by_fraction.max() - by_fraction.min()).T, "methods differ most"
    else:
        spread = (table.max(axis=1) - table.min(axis=1)).to_frame(name=np.nan)
        what = "fractions differ most"
    turns = sorted(spread.columns, key=lambda f: -spread[f].max())
    turns = [f for f in turns if spread[f].max() > 0] or turns  # one method alone: no spread
    picks: list[tuple[str, str]] = []
    for turn in range(min(differ, len(spread))):
        fraction = turns[turn % len(turns)]
        left = spread.loc[[i for i in spread.index if i not in dict(picks)], fraction]
        image = sorted(left.index, key=lambda i: (-left[i], i))[0]
        where = f" at {fraction * 100:g}% labels" if np.isfinite(fraction) else ""
        picks.append((image, f"{what}: Dice spread {left[image]:.2f}{where}"))
    mean = table.mean(axis=1)
    rest = sorted((i for i in mean.index if i not in dict(picks)),
                  key=lambda i: (abs(mean[i] - mean.median()), i))
    return picks + [(i, f"typical: mean Dice {mean[i]:.2f}") for i in rest[:typical]]


def gallery_trials(chosen: pd.DataFrame) -> pd.DataFrame:
    """One trial per (method, label fraction): the smallest seed that every setting ran (else
    each setting's smallest)."""
    settings = chosen.groupby(["method", "label_fraction"])["seed"].apply(set)
    common = set.intersection(*settings) if len(settings) else set()
    pick = chosen[chosen["seed"] == min(common)] if common else chosen
    return (pick.sort_values(["label_fraction", "method", "seed", "run_id"])
            .drop_duplicates(["method", "label_fraction"]).reset_index(drop=True))


def section_config(params: dict[str, str], section: str, cls: type) -> Any:
    """A config section's dataclass (e.g. DataConfig) rebuilt from a run's logged params
    (strings: `section.field`), each value converted to its field's default's type."""
    values = {}
    for f in dataclasses.fields(cls):
        text = params.get(f"{section}.{f.name}")
        if text is None:
            continue
        default = getattr(cls(), f.name)
        try:
            values[f.name] = (text == "True" if isinstance(default, bool) else
                              type(default)(text) if isinstance(default, (int, float, str)) else text)
        except ValueError:
            raise SemisegError(f"logged param {section}.{f.name}={text!r}: expected a "
                               f"{type(default).__name__}") from None
    return cls(**values)


def build_gallery(uri: str, chosen: pd.DataFrame, per_image: pd.DataFrame,
                  differ: int = DIFFER, typical: int = TYPICAL) -> Gallery | None:
    """The picked images and every setting's prediction of them; None without per-image
    metrics (nothing to pick from) or when a shown trial logged no checkpoint."""
    from semiseg.config import DataConfig, ModelConfig
    from semiseg.data import load_dataset

    picks = pick_images(chosen, per_image, differ, typical)
    if not picks:
        return None
    shown = gallery_trials(chosen)
    data = load_dataset(section_config(shown["run_params"].iloc[0], "data", DataConfig))
    where = {image_id: i for i, image_id in enumerate(data.ids)}
    missing = [i for i, _ in picks if i not in where]
    if missing:
        raise SemisegError(f"test images {missing[:3]} of the runs are not in the dataset "
                           f"{data.source} rebuilt from their data.* params")
    index = [where[i] for i, _ in picks]
    images, masks = np.asarray(data.images[index], np.float32), np.asarray(data.masks[index])
    preds, dice, runs = {}, {}, {}
    for row in shown.itertuples():
        try:
            checkpoint = tracking.download_checkpoint(uri, row.run_id)
        except SemisegError:
            return None  # tracking.log_model was off: no model to predict with
        model_cfg = section_config(row.run_params, "model", ModelConfig)
        key = (row.method, float(row.label_fraction))
        preds[key] = predict(checkpoint, model_cfg, images, data.num_classes, data.in_channels)
        dice[key], runs[key] = image_dice(preds[key], masks, data.classes), row.run_id
        check_logged(dice[key], per_image, row.run_id, [i for i, _ in picks])
    return Gallery([i for i, _ in picks], [r for _, r in picks], images, masks, preds, dice, runs)


def check_logged(recomputed: np.ndarray, per_image: pd.DataFrame, run_id: str,
                 ids: list[str], tolerance: float = MAX_DICE_GAP) -> None:
    """Raise unless the recomputed per-image Dice matches what the trial logged for the same
    images: else the model or the images are not the ones the trial was scored with (e.g. a
    dataset folder that changed since). The tolerance allows for a trial scored under bf16
    autocast on a GPU, recomputed here in float32 on the CPU."""
    logged = (per_image[per_image["run_id"] == run_id].groupby("id")[paired.IMAGE_KEY].mean()
              .reindex(ids).to_numpy(float))
    both = np.isfinite(logged) & np.isfinite(recomputed)
    gap = float(np.abs(logged[both] - recomputed[both]).mean()) if both.any() else 0.0
    if gap > tolerance or not np.array_equal(np.isfinite(logged), np.isfinite(recomputed)):
        raise SemisegError(f"run {run_id}: its model recomputes a per-image test Dice that differs "
                           f"from the logged one by {gap:.3f} on average (expected <= {tolerance}):"
                           " the dataset rebuilt from its data.* params is not the one it was "
                           "tested on")


def predict(checkpoint: Path, model_cfg: Any, images: np.ndarray, num_classes: int,
            in_channels: int) -> np.ndarray:
    """(N, H, W) label maps of the checkpoint's selected model on (N, [C,] H, W) images."""
    import torch

    from semiseg.sam.coarse import load_coarse_model

    model = load_coarse_model(checkpoint, model_cfg, num_classes, in_channels=in_channels)
    x = torch.from_numpy(images if images.ndim == 4 else images[:, None])
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def image_dice(pred: np.ndarray, masks: np.ndarray, classes: list[str]) -> np.ndarray:
    """Per-image Dice, mean over the foreground classes it holds (as test_per_image.json)."""
    import torch

    from semiseg.metrics import MetricAccumulator, _nanmean

    acc = MetricAccumulator(classes)
    acc.update(torch.from_numpy(pred).long(), torch.from_numpy(masks).long())
    return np.asarray(_nanmean(acc.per_image("dice"), axis=1), float)


def plot_gallery(gallery: Gallery, path: Path) -> Path:
    """Rows: images; columns: image, ground truth, then each setting by label fraction."""
    from semiseg.overlays import colorize
    from semiseg.report import _figure, percent

    keys = sorted(gallery.preds, key=lambda k: (k[1], k[0]))
    rows, cols = len(gallery.ids), 2 + len(keys)
    fig = _figure(1.3 * cols + 0.3, 1.45 * rows + 0.4)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r in range(rows):
        image = gallery.images[r] if gallery.images[r].ndim == 2 else gallery.images[r][0]
        layers = [("image", None, ""), ("ground truth", gallery.masks[r], "")]
        layers += [(f"{m}\n{percent(f)} labels", gallery.preds[(m, f)][r],
                    f"Dice {gallery.dice[(m, f)][r]:.3f}") for m, f in keys]
        for c, (title, layer, note) in enumerate(layers):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", interpolation="nearest")  # compresses far better
            if layer is not None:
                ax.imshow(colorize(layer), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7.5)
            ax.set_xlabel(note, fontsize=7.5, labelpad=2)
        axes[r, 0].set_ylabel(f"{gallery.ids[r]}\n{textwrap.fill(gallery.reasons[r], 24)}", fontsize=6.5)
    fig.savefig(path, dpi=DPI)
    return Path(path)
