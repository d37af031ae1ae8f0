"""Reading torch checkpoints safely (`weights_only=True`) with errors that name the file, and
the name of the file a training checkpoint folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from semiseg.errors import SemisegError

CHECKPOINT_FILE = "checkpoint.pt"
"""The file a training checkpoint folder holds (the engine writes it; the SAM chain reads it)."""


def read_weights_only(path: Path, what: str, error: type[SemisegError] = SemisegError) -> Any:
    """torch.load(path, weights_only=True); any failure is `error("cannot read <what> <path>: ...")`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle, zip, EOF and OS errors all mean "unreadable")
        raise error(f"cannot read {what} {path}: {exc}") from None


def mismatch_summary(exc: RuntimeError, limit: int = 300) -> str:
    """The first informative line of a load_state_dict error (missing/unexpected keys, shapes)."""
    lines = str(exc).splitlines()
    return (lines[1].strip() if len(lines) > 1 else str(exc))[:limit]
