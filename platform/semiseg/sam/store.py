"""Where refined pseudo-labels go: one PNG label map and one JSON row per image, written
atomically (temp file, then rename), and a parquet manifest assembled from the rows. A row
records the image's training and source (native) size, SAM's predicted IoU and, with the
quality gate, the agreement with the coarse mask and whether SAM's mask was used per class;
the gate's decision (semiseg.sam.gate) is gate/gate.json.

An image is done when its row exists; the row is written after its mask, so an interrupted run
leaves at worst a mask without a row, which the rerun overwrites. Nothing half-written is ever
visible under a final name.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from PIL import Image

from semiseg.errors import SemisegError
from semiseg.sam.gate import GateDecision

MANIFEST = "manifest.parquet"
GATE = "gate/gate.json"


def image_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice per foreground class; NaN where the class is in neither map."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        total = int(p.sum() + t.sum())
        out.append(2.0 * float((p & t).sum()) / total if total else math.nan)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


class PseudoLabelStore:
    """A folder of refined pseudo-labels: masks/, rows/ and manifest.parquet."""

    def __init__(self, root: str | Path, classes: list[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.classes = classes
        (self.root / "masks").mkdir(parents=True, exist_ok=True)
        (self.root / "rows").mkdir(parents=True, exist_ok=True)
        (self.root / "gate").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def stem(index: int, image_id: str) -> str:
        return f"{index:06d}_{re.sub(r'[^A-Za-z0-9._-]', '_', image_id)}"

    def claim(self, identity: dict[str, Any]) -> None:
        """Record what makes these pseudo-labels (data, split, coarse model, SAM settings) on first
        use, and refuse to resume a folder made by something else: skipping its done images
        would silently mix two sets of pseudo-labels."""
        path = self.root / "identity.json"
        if path.exists():
            found = json.loads(path.read_text())
            if found != identity:
                changed = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
                raise SemisegError(f"{self.root} holds pseudo-labels made with a different {', '.join(changed)}; "
                                   f"use another output folder or delete this one")
            return
        _atomic(path, lambda tmp: tmp.write_text(json.dumps(identity, sort_keys=True)))

    def remove_stale_temp_files(self) -> int:
        """Temp files a killed run left (hidden names, never read). Only the driver calls this,
        before any writer starts: a running writer's temp file must not be pulled away."""
        stale = [*(self.root / "masks").glob(".*.tmp"), *(self.root / "rows").glob(".*.tmp"),
                 *(self.root / "gate").glob(".*.tmp"), *self.root.glob(".*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def done(self) -> set[int]:
        """Dataset indices whose row (hence mask) is complete."""
        return {int(p.name.split("_", 1)[0]) for p in (self.root / "rows").glob("*.json")}

    def write(self, index: int, image_id: str, refined: np.ndarray, scores: dict[int, float],
              coarse: np.ndarray | None = None, truth: np.ndarray | None = None, *,
              sam: np.ndarray | None = None, agreement: np.ndarray | None = None,
              used: Iterable[int] | None = None, native_shape: tuple[int, int] | None = None,
              ) -> dict[str, Any]:
        """Write the pseudo-label `refined` (what a method trains on) and its row. Optional: SAM's
        own map before the gate (`sam`), its IoU with the coarse map per class (`agreement`),
        the classes whose refined mask was used (`used`) and the image's source size."""
        stem = self.stem(index, image_id)
        mask_path = self.root / "masks" / f"{stem}.png"
        _atomic(mask_path, lambda tmp: Image.fromarray(refined.astype(np.uint8)).save(tmp, format="PNG"))
        row = self.row(index, image_id, mask_path, refined, scores, coarse, truth)
        row.update(self.gate_columns(refined, sam, truth, agreement, used, native_shape))
        _atomic(self.root / "rows" / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(row)))
        return row

    def row(self, index: int, image_id: str, mask_path: Path, refined: np.ndarray,
            scores: dict[int, float], coarse: np.ndarray | None, truth: np.ndarray | None) -> dict[str, Any]:
        n = len(self.classes)
        row: dict[str, Any] = {"index": index, "image_id": image_id, "path": str(mask_path),
                               "classes": ",".join(self.classes[c] for c in range(1, n) if (refined == c).any())}
        for c in range(1, n):
            row[f"sam_iou/{self.classes[c]}"] = scores.get(c, math.nan)
        if truth is not None:
            before = image_dice(coarse, truth, n) if coarse is not None else [math.nan] * (n - 1)
            after = image_dice(refined, truth, n)
            row["dice_before"], row["dice_after"] = _mean(before), _mean(after)
            for c in range(1, n):
                row[f"dice_before/{self.classes[c]}"] = before[c - 1]
                row[f"dice_after/{self.classes[c]}"] = after[c - 1]
        return row

    def gate_columns(self, refined: np.ndarray, sam: np.ndarray | None, truth: np.ndarray | None,
                     agreement: np.ndarray | None, used: Iterable[int] | None,
                     native_shape: tuple[int, int] | None) -> dict[str, Any]:
        """Both sizes; per class the agreement, whether SAM's mask was used and SAM's own Dice."""
        n, names = len(self.classes), self.classes
        native = tuple(native_shape) if native_shape is not None else refined.shape
        out: dict[str, Any] = {"image_height": int(refined.shape[0]), "image_width": int(refined.shape[1]),
                               "native_height": int(native[0]), "native_width": int(native[1])}
        if agreement is not None:
            out.update({f"agreement/{names[c]}": float(agreement[c]) for c in range(1, n)})
        if used is not None:
            chosen = set(used)
            out.update({f"sam_used/{names[c]}": float(c in chosen) for c in range(1, n)})
        if sam is not None and truth is not None:
            dice = image_dice(sam, truth, n)
            out["dice_sam"] = _mean(dice)
            out.update({f"dice_sam/{names[c]}": dice[c - 1] for c in range(1, n)})
        return out

    def write_gate(self, decision: GateDecision) -> Path:
        target = self.root / GATE
        _atomic(target, lambda tmp: tmp.write_text(decision.to_json()))
        return target

    def read_gate(self) -> GateDecision | None:
        """The gate decided by an earlier run into this folder (a resumed run reuses it, so every
        image of one manifest is gated alike), or None."""
        path = self.root / GATE
        return GateDecision.from_json(path.read_text(), str(path)) if path.is_file() else None

    def write_manifest(self) -> Path:
        rows = [json.loads(p.read_text()) for p in sorted((self.root / "rows").glob("*.json"))]
        frame = pd.DataFrame(rows).sort_values("index").reset_index(drop=True)
        target = self.root / MANIFEST
        _atomic(target, lambda tmp: frame.to_parquet(tmp, index=False))
        return target


def _atomic(target: Path, write: Any) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A manifest with every mask it names present; clear errors otherwise."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise SemisegError(f"pseudo-label manifest not found: {path} (run `semiseg pseudolabel` first)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001  (arrow raises several types for a bad file)
        raise SemisegError(f"cannot read pseudo-label manifest {path}: {exc}") from None
    for column in ("index", "image_id", "path"):
        if column not in frame.columns:
            raise SemisegError(f"{path}: manifest has no {column!r} column")
    missing = [p for p in frame["path"] if not Path(p).is_file()]
    if missing:
        raise SemisegError(f"{path}: {len(missing)} pseudo-label masks are missing, e.g. {missing[0]}")
    return frame
