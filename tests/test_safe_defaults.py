"""Safe defaults, checked on the source and on a running Ray: checkpoints load tensors only,
YAML loads plain data only, nothing unpickles or runs through a shell, and a local Ray started
by semiseg is reachable from this machine only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load(...), '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _literal_kw(call: ast.Call, keyword: str) -> bool | None:
    """True/False for a literal keyword value, None when absent or not a literal."""
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value.value if isinstance(kw.value, ast.Constant) else None
    return None


def _has_kw(call: ast.Call, keyword: str) -> bool:
    return any(kw.arg == keyword for kw in call.keywords)


def _call_problem(name: str, call: ast.Call) -> str | None:
    """What is unsafe about one call, if anything."""
    if name == "torch.load" and _literal_kw(call, "weights_only") is not True:
        return "torch.load without weights_only=True"
    if name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
        return f"{name} (use yaml.safe_load)"
    if _has_kw(call, "shell") and _literal_kw(call, "shell") is not False:
        return f"{name or 'call'}(shell=...) runs through a shell"
    if name in ("os.system", "os.popen"):
        return f"{name} runs through a shell"
    if name in ("pickle.load", "pickle.loads") or (
            name in ("np.load", "numpy.load") and _has_kw(call, "allow_pickle")
            and _literal_kw(call, "allow_pickle") is not False):
        return f"{name} unpickles (runs code from the file)"
    return None


def problems(source: str, where: str) -> list[str]:
    """Every unsafe call in one module's source, as 'where:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            found += [f"{where}:{node.lineno}: from yaml import {a.name}"
                      for a in node.names if a.name in UNSAFE_YAML]
        if isinstance(node, ast.Call) and (what := _call_problem(_dotted(node.func), node)):
            found.append(f"{where}:{node.lineno}: {what}")
    return found


def _platform_sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PLATFORM.rglob("*.py"))]


def test_the_scan_catches_each_unsafe_call() -> None:
    """The checker itself: a scan that finds nothing must mean there is nothing."""
    bad = ("import torch, yaml, subprocess, os\nfrom yaml import load\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(f)\nyaml.unsafe_load(f)\n"
           "subprocess.run(c, shell=True)\nsubprocess.Popen(c, shell=flag)\nos.system(c)\n"
           "pickle.load(f)\nnp.load(p, allow_pickle=True)\n")
    assert len(problems(bad, "bad.py")) == 10
    good = ("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(f)\n"
            "subprocess.run(['ls'], shell=False)\nsubprocess.run(['ls'])\nnp.load(p)\n")
    assert problems(good, "good.py") == []


def test_platform_has_no_unsafe_loads_or_shells() -> None:
    sources = _platform_sources()
    assert any("torch.load(" in text for _, text in sources)  # the scan sees the real loads
    assert any("yaml.safe_load(" in text for _, text in sources)
    found = [msg for path, text in sources for msg in problems(text, str(path.relative_to(REPO)))]
    assert found == []


_PROBE = """
import json, os, ray
import psutil  # importable once ray is: Ray ships it in ray/thirdparty_files
from semiseg.distributed.cluster import connect
connect("")
node = ray._private.worker._global_node
procs = [psutil.Process(p.process.pid) for ps in node.all_processes.values() for p in ps]
procs += [c for p in procs for c in p.children(recursive=True)]
listen = sorted({c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == "LISTEN"})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listen": listen,
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes()]}))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only() -> None:
    """semiseg's own connect() (no address, no $RAY_ADDRESS): the GCS, the node and every
    listening socket of Ray's processes are on 127.0.0.1, not on the machine's network IP."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as ray_tmp:  # short socket paths
        env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled",
                   PYTHONPATH=os.pathsep.join([str(PLATFORM), env.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["gcs"].startswith("127.0.0.1:") and seen["nodes"] == ["127.0.0.1"]
    assert seen["listen"] and set(seen["listen"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, seen


def test_storage_paths_are_absolute_or_uris(tmp_path: Path, monkeypatch) -> None:
    """Ray workers run in other directories: a relative ray.storage_path must be resolved."""
    from semiseg.distributed.cluster import storage_path

    monkeypatch.chdir(tmp_path)
    assert storage_path("ray_results") == str(tmp_path / "ray_results")
    assert storage_path("s3://bucket/x") == "s3://bucket/x"


def _imported_roots(source: str) -> set[str]:
    """Top-level packages a module imports, e.g. {'mlflow'} for `from mlflow.entities import X`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_mlflow_is_imported_only_in_the_tracking_package() -> None:
    """MLflow stays at the edge (DESIGN.md): only platform/semiseg/tracking/ imports it,
    at the top of a module or inside a function."""
    tracking_dir = PLATFORM / "semiseg" / "tracking"
    importers = {path for path, text in _platform_sources() if "mlflow" in _imported_roots(text)}
    assert any(p.parent == tracking_dir for p in importers)  # the scan sees the real imports
    assert sorted(str(p.relative_to(REPO)) for p in importers if p.parent != tracking_dir) == []
    assert _imported_roots("import mlflow.artifacts\nfrom mlflow import x\n") == {"mlflow"}
