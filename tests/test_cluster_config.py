"""cluster.yaml is a valid Ray cluster launcher config, checked offline with Ray's own code:
`prepare_config` (merge with the provider's defaults.yaml) and `validate_config` (ray-schema.json
plus Ray's cross-field checks) are the steps `ray up` runs before it first talks to the cloud.
On top of that: GPU workers exist, nothing is opened to the internet, the dashboard stays on
127.0.0.1, setup installs the project, and multi-node storage is provided for."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"  # what validate_config reads


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text: str) -> dict[str, Any]:
    config = yaml.safe_load(text)
    assert isinstance(config, dict), f"{CLUSTER_YAML} is not a YAML mapping"
    return config


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) in a nested dict/list."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _commands(config: dict[str, Any], key: str) -> str:
    return "\n".join(str(c) for c in config.get(key) or [])


# ---- Ray's own validation -------------------------------------------------------------------


def test_raw_config_matches_ray_schema(raw: dict[str, Any]) -> None:
    jsonschema.validate(raw, json.loads(SCHEMA.read_text()))


def test_ray_up_validation_passes(raw: dict[str, Any]) -> None:
    # What `ray up` does before any cloud call: fill in defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_unknown_top_level_key_fails_validation(raw: dict[str, Any]) -> None:
    mutated = copy.deepcopy(raw)
    mutated["dashboard_port_open_to_world"] = True
    with pytest.raises(jsonschema.ValidationError, match="dashboard_port_open_to_world"):
        validate_config(prepare_config(mutated))


def test_head_node_type_missing_fails_validation(raw: dict[str, Any]) -> None:
    mutated = copy.deepcopy(raw)
    mutated["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(mutated))


# ---- what semiseg needs from it --------------------------------------------------------------


def test_cluster_name_and_single_provider(raw: dict[str, Any]) -> None:
    assert raw["cluster_name"] == "semiseg"
    assert raw["provider"]["type"] == "aws"


def test_head_is_cpu_only(raw: dict[str, Any]) -> None:
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "trials must not be scheduled on the head"


def test_gpu_worker_types_autoscale_from_zero(raw: dict[str, Any]) -> None:
    workers = {name: t for name, t in raw["available_node_types"].items()
               if name != raw["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, f"no worker node type declares GPU resources: {sorted(workers)}"
    for name, node_type in gpu.items():
        assert node_type.get("min_workers", 0) == 0, f"{name}: GPU nodes should scale from 0"
        assert node_type["max_workers"] >= 1, f"{name}: max_workers must allow a node"
        assert node_type["resources"].get("CPU", 0) >= 1, f"{name}: declare its CPUs too"
    assert raw["max_workers"] >= max(t["max_workers"] for t in gpu.values())


def test_nothing_open_to_the_internet(raw: dict[str, Any], text: str) -> None:
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "0.0.0.0/0" not in uncommented and "::/0" not in uncommented
    for path, value in _walk(raw):
        if path.rsplit(".", 1)[-1] in ("IpPermissions", "ingress", "IpRanges", "sourceRanges"):
            pytest.fail(f"{path}: cluster.yaml must not add ingress rules ({value!r})")
    assert "--dashboard-host=0.0.0.0" not in uncommented


def test_dashboard_bound_to_localhost(raw: dict[str, Any]) -> None:
    head = _commands(raw, "head_start_ray_commands")
    assert "ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "--disable-usage-stats" in head
    assert "--disable-usage-stats" in _commands(raw, "worker_start_ray_commands")


def test_token_auth_on_every_node(raw: dict[str, Any]) -> None:
    # A worker that starts without the token cannot join a token-auth head.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in _commands(raw, key), key
    assert "~/.ray/auth_token" in raw["file_mounts"]


def test_setup_installs_the_project(raw: dict[str, Any]) -> None:
    setup = _commands(raw, "setup_commands")
    assert re.search(r"pip install\b.*(-e\s+)?~/semiseg\b", setup), setup
    synced = {str(v) for v in raw["file_mounts"].values()}
    assert "." in synced or "git clone" in setup, "the repository is neither synced nor cloned"


def test_multi_node_storage_is_documented(raw: dict[str, Any], text: str) -> None:
    assert raw.get("file_mounts"), "file_mounts must sync the repository to every node"
    assert re.search(r"ray\.storage_path=s3://|storage_path.*(nfs|efs)", text, re.IGNORECASE), \
        "cluster.yaml must say that ray.storage_path needs shared storage (s3:// or NFS)"


def test_header_gives_the_launch_commands(text: str) -> None:
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for command in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray down cluster.yaml",
                    "ray job submit --address http://127.0.0.1:8265 --working-dir .",
                    "semiseg sweep experiments/", "ray.address=auto", "ray.use_gpu=true"):
        assert command in header, f"header comment lacks {command!r}"


def test_experiments_named_in_header_exist(text: str) -> None:
    named = set(re.findall(r"experiments/[\w./-]+\.yaml", text))
    assert named
    for rel in named:
        assert (REPO / rel).is_file(), f"cluster.yaml names {rel}, which does not exist"
