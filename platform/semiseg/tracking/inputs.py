"""A trial's data as MLflow dataset inputs (what `mlflow.log_input` logs), so the runs table's
Dataset column names the data each run trained, selected and was tested on.

One input per context, train (labeled + unlabeled images), val and test, each with the
dataset's name, its source (the folder it was read from, or the package that generates or
ships it) and a digest of the data config and that context's rows of the split manifest: two
runs with the same digest saw the same images in that role. The records are plain JSON, so a
RunLogger can spool them like any other record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import semiseg

CONTEXTS = {"train": ("labeled", "unlabeled"), "val": ("val",), "test": ("test",)}
# Data config keys that change no image of a context: the manifest already records which images
# are labeled, and the batch size is how they are drawn. Left out of the digest so that, e.g.,
# the val and test digests stay equal across label fractions.
NOT_IN_DIGEST = ("label_fraction", "batch_size")


def _source(source: str, name: str) -> tuple[str, str]:
    """(source_type, source JSON) as MLflow writes them: "local" with the folder's URI for data
    read from disk, "code" naming the package otherwise (generated or shipped data)."""
    if source and Path(source).is_absolute() and Path(source).exists():
        return "local", json.dumps({"uri": str(Path(source).resolve())})
    tags = {"package": "semiseg", "version": semiseg.__version__, "dataset": name,
            "loader": source or name}
    return "code", CodeDatasetSource(tags).to_json()


def dataset_records(name: str, source: str, data_config: dict[str, Any],
                    manifest: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One record per context (see the module docstring); `manifest` is the split manifest
    (rows with at least "role" and "group"), `data_config` the resolved `data` section."""
    config = {k: v for k, v in data_config.items() if k not in NOT_IN_DIGEST}
    source_type, source_json = _source(source, name)
    records = []
    for context, roles in CONTEXTS.items():
        rows = [row for row in manifest if row.get("role") in roles]
        blob = json.dumps({"config": config, "rows": rows}, sort_keys=True, default=str)
        profile = {"images": len(rows), "groups": len({row.get("group") for row in rows}),
                   **{role: sum(row.get("role") == role for row in rows) for role in roles}}
        records.append({"name": name, "digest": hashlib.sha256(blob.encode()).hexdigest()[:12],
                        "source_type": source_type, "source": source_json,
                        "profile": json.dumps(profile), "context": context})
    return records


def to_dataset_inputs(records: list[dict[str, str]]) -> list[DatasetInput]:
    return [DatasetInput(Dataset(r["name"], r["digest"], r["source_type"], r["source"],
                                 profile=r["profile"]),
                         [InputTag(MLFLOW_DATASET_CONTEXT, r["context"])]) for r in records]
