"""The spool of MLflow records that could not be sent yet: plain JSONL files, no MLflow here
(tracking/logger.py replays them)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

SPOOL_GLOB = "*/mlflow_spool.*.jsonl"


def spool_root(storage: str) -> Path:
    """Spools live under a local ray.storage_path, next to the checkpoints, so they outlive a
    worker and the next sweep finds them; with s3:// storage, under this machine's temp dir."""
    return Path(tempfile.gettempdir()) / "semiseg-mlflow-spool" if "://" in storage else Path(storage)


def spool_path(storage: str, run_name: str, who: str) -> Path:
    """One spool per writer (e.g. 'trial', 'rank0'), so two processes never append to one file;
    a restarted worker takes over its predecessor's spool."""
    return spool_root(storage) / run_name / f"mlflow_spool.{who}.jsonl"


def describe(record: dict[str, Any]) -> str:
    op, data = record["op"], record["data"]
    if op == "metrics":
        return f"metrics step {data['step']}: {', '.join(sorted(data['values']))}"
    if op in ("params", "tags"):
        return f"{len(data)} {op}"
    if op == "inputs":
        return f"dataset inputs {', '.join(r['context'] for r in data)}"
    return {"dict": f"artifact {data.get('file')}", "files": f"artifacts {data.get('path')}/",
            "model": f"model {data.get('name')}", "end": f"run status {data.get('status')}"}[op]


class Spool:
    """An append-only JSONL file of unsent records; artifacts are copied beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if record["op"] in ("files", "model"):  # the source is usually a temp dir about to vanish
            copy = self.path.with_suffix(".files") / uuid.uuid4().hex
            shutil.copytree(record["data"]["dir"], copy)
            record = {**record, "data": {**record["data"], "dir": str(copy)}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def reject(self, record: dict[str, Any], reason: str) -> Path:
        """Set aside a record the server refuses, so it cannot block the ones behind it."""
        rejected = self.path.with_name("rejected." + self.path.name)  # not matched by SPOOL_GLOB
        with rejected.open("a") as f:
            f.write(json.dumps({**record, "rejected": reason}) + "\n")
        return rejected

    def keep_only(self, records: list[dict[str, Any]]) -> None:
        """Rewrite atomically with what is still unsent; remove the spool once empty."""
        if records:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, self.path)
            return
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.path.with_suffix(".files"), ignore_errors=True)
