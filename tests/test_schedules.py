"""Every manifest under experiments/schedules/ (globbed, so a new one is checked the moment it is
added) has the fields its kind needs to run the nightly sweep: KubeRay RayJob / RayCronJob, or a
Kubernetes batch/v1 CronJob that runs `ray job submit`. Offline: no cluster, no kubectl."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = REPO / "experiments" / "schedules"
MANIFESTS = sorted(SCHEDULES.glob("**/*.y*ml"))

# ---- a small 5-field cron validator ---------------------------------------------------------

_MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
_DAYS = "SUN MON TUE WED THU FRI SAT".split()
# (name, lowest, highest, names usable for values); day-of-week 7 is Sunday, as in Kubernetes.
_FIELDS = [("minute", 0, 59, []), ("hour", 0, 23, []), ("day of month", 1, 31, []),
           ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS)]
_ITEM = re.compile(r"^(?:(?P<star>\*)|(?P<lo>\w+)(?:-(?P<hi>\w+))?)(?:/(?P<step>\d+))?$")


def _value(token: str, lowest: int, highest: int, names: list[str]) -> int:
    if token.upper() in names:
        return names.index(token.upper()) + (1 if names is _MONTHS else 0)
    if not token.isdigit():
        raise ValueError(f"{token!r} is not a number")
    value = int(token)
    if not lowest <= value <= highest:
        raise ValueError(f"{value} is outside {lowest}-{highest}")
    return value


def cron_errors(expression: str) -> list[str]:
    """Why a standard 5-field cron expression is invalid; empty when it is valid."""
    fields = expression.split()
    if len(fields) != 5:
        return [f"{expression!r}: expected 5 fields (minute hour day month weekday), "
                f"got {len(fields)}"]
    errors = []
    for text, (name, lowest, highest, names) in zip(fields, _FIELDS):
        for item in text.split(","):
            match = _ITEM.match(item)
            try:
                if not match:
                    raise ValueError("expected *, N, N-M, or either with /STEP")
                if match["step"] is not None and int(match["step"]) == 0:
                    raise ValueError("step 0")
                if match["lo"] is not None:
                    lo = _value(match["lo"], lowest, highest, names)
                    if match["hi"] is not None and _value(match["hi"], lowest, highest, names) < lo:
                        raise ValueError("range runs backwards")
            except ValueError as e:
                errors.append(f"{name} field {item!r}: {e}")
    return errors


@pytest.mark.parametrize("expression", [
    "0 2 * * *", "*/15 * * * *", "0 2 * * 1-5", "30 3 1,15 * *", "0 0 * JAN-MAR SUN", "5 4 * * 7",
])
def test_cron_validator_accepts(expression: str) -> None:
    assert cron_errors(expression) == []


@pytest.mark.parametrize("expression", [
    "0 2 * *", "0 2 * * * *", "60 2 * * *", "0 24 * * *", "0 2 0 * *", "0 2 * 13 *",
    "0 2 * * 8", "*/0 * * * *", "0 5-2 * * *", "@daily", "0 2 ? * *", "a b c d e",
])
def test_cron_validator_rejects(expression: str) -> None:
    assert cron_errors(expression)


# ---- checks per kind ------------------------------------------------------------------------


def _get(doc: Any, dotted: str) -> Any:
    node = doc
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            pytest.fail(f"missing {dotted} (no {key!r})")
        node = node[key]
    return node


def _check_experiments_named(command: str) -> None:
    named = re.findall(r"experiments/[\w./-]+\.ya?ml", command)
    assert named, f"the command names no experiments/*.yaml: {command!r}"
    for rel in named:
        assert (REPO / rel).is_file(), f"{rel} (named in {command!r}) does not exist"


def _check_sweep_command(command: str) -> None:
    assert "semiseg sweep" in command, command
    # Inside a Ray job the sweep must join the job's cluster instead of starting its own Ray.
    assert "ray.address=auto" in command, command
    # An unreplaced <placeholder> would be parsed by the shell as a redirection.
    assert not re.search(r"<[\w-]+>", command), f"angle-bracket placeholder in {command!r}"
    shlex.split(command)  # quotes balance
    _check_experiments_named(command)


def _containers(pod_template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = (pod_template.get("spec") or {}).get("containers") or []
    assert containers, f"{where}.template.spec.containers is empty"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: every container needs name and image"
    return containers


def _check_rayjob_spec(spec: dict[str, Any]) -> None:
    _check_sweep_command(_get(spec, "entrypoint"))
    assert spec.get("shutdownAfterJobFinishes") is True, "the cluster must go when the job ends"
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0, f"ttlSecondsAfterFinished={ttl!r}"

    runtime_env = yaml.safe_load(_get(spec, "runtimeEnvYAML"))
    assert isinstance(runtime_env, dict), "runtimeEnvYAML must be a YAML mapping"
    assert "working_dir" in runtime_env or "pip" in runtime_env, runtime_env
    env_vars = runtime_env.get("env_vars") or {}
    assert str(env_vars.get("MLFLOW_TRACKING_URI", "")).startswith(("http://", "https://")), \
        "runtimeEnvYAML.env_vars.MLFLOW_TRACKING_URI must name a shared MLflow server"
    assert "PYTHONPATH" not in env_vars, "semiseg sets PYTHONPATH for its workers; Ray " \
                                         "rejects a job env_vars key the driver also sets"

    cluster = _get(spec, "rayClusterSpec")
    head = _containers(_get(cluster, "headGroupSpec.template"), "headGroupSpec")
    groups = cluster.get("workerGroupSpecs") or []
    assert groups, "rayClusterSpec.workerGroupSpecs is empty"
    gpu_groups = []
    for group in groups:
        where = f"workerGroupSpecs[{group.get('groupName')}]"
        workers = _containers(_get(group, "template"), where)
        limits = (workers[0].get("resources") or {}).get("limits") or {}
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
        assert workers[0]["image"] == head[0]["image"], f"{where}: head and workers differ"
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit"


def check_rayjob(doc: dict[str, Any]) -> None:
    _check_rayjob_spec(_get(doc, "spec"))


def check_raycronjob(doc: dict[str, Any]) -> None:
    assert cron_errors(_get(doc, "spec.schedule")) == []
    # jobTemplate is a RayJob spec, as in KubeRay's ray-cronjob.sample.yaml.
    _check_rayjob_spec(_get(doc, "spec.jobTemplate"))


def check_cronjob(doc: dict[str, Any]) -> None:
    spec = _get(doc, "spec")
    errors = cron_errors(_get(spec, "schedule"))
    assert errors == [], errors
    assert spec.get("concurrencyPolicy") == "Forbid", "two nightly sweeps must never overlap"
    pod = _get(spec, "jobTemplate.spec.template")
    assert pod["spec"].get("restartPolicy") in ("OnFailure", "Never")
    container = _containers(pod, "jobTemplate.spec")[0]
    command = " ".join(str(part) for part in
                       (container.get("command") or []) + (container.get("args") or []))
    assert "ray job submit" in command, command
    assert re.search(r"--address[ =]http://[\w.-]+:8265", command), command
    _check_sweep_command(command)


CHECKS: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {
    ("ray.io/v1", "RayJob"): check_rayjob,
    ("ray.io/v1", "RayCronJob"): check_raycronjob,
    ("batch/v1", "CronJob"): check_cronjob,
}


# ---- the manifests --------------------------------------------------------------------------


def test_schedules_exist() -> None:
    kinds = {yaml.safe_load(p.read_text()).get("kind") for p in MANIFESTS}
    assert "RayJob" in kinds, f"no RayJob under {SCHEDULES}"
    assert kinds & {"RayCronJob", "CronJob"}, f"no nightly schedule under {SCHEDULES}"


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest(path: Path) -> None:
    text = path.read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), f"{path.name}: expected one YAML mapping"
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in CHECKS, f"{path.name}: {key} is not one of {sorted(CHECKS)}"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", _get(doc, "metadata.name") or "")
    assert "kubectl apply" in text.split("\napiVersion")[0], \
        f"{path.name}: the header comment must give the kubectl apply command"
    CHECKS[key](doc)
