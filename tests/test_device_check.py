"""bench/device_check.py: its --smoke mode runs every part at toy sizes on the CPU (real Ray,
real TorchTrainer and Tune, a real tiny SAM) and records a number for every figure, so the
script that measures the GPU figures cannot rot between the rare GPU sessions; and a part that
fails is recorded while the others still run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_check.py"
PARTS = {"P1", "P2", "P3", "P4", "P6"}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("device-check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text()


def test_smoke_measures_every_part(smoke) -> None:
    report, _ = smoke
    assert report["meta"]["smoke"] is True and report["meta"]["device"] == "cpu"
    parts = report["parts"]
    assert set(parts) == PARTS
    failed = {name: part.get("error") for name, part in parts.items() if part["status"] != "ok"}
    assert not failed
    p1, p2, p3, p4, p6 = (parts[name]["result"] for name in sorted(PARTS))
    from semiseg.methods import METHODS

    assert set(p1["methods"]) == set(p4["methods"]) == set(METHODS.names())
    for row in p1["methods"].values():
        assert all(finite(row[k]) and row[k] > 0 for k in ("plain_img_s", "ray_img_s", "ratio"))
    assert all(finite(p2[k]) and p2[k] > 0 for k in ("naive_img_s", "batched_img_s", "speedup"))
    assert 0 <= p2["mask_iou"] <= 1
    assert p3["trials"] == 2 and len(p3["tune_fit_s"]) == 2
    assert all(finite(p3[k]) and p3[k] > 0 for k in ("sequential_s", "tune_s", "ratio"))
    assert p4["methods"]["supervised"]["ratio"] == 1.0
    assert all(finite(row["ratio"]) and row["ratio"] > 0 for row in p4["methods"].values())


def test_smoke_p6_has_every_variant_or_a_reason(smoke) -> None:
    rows = smoke[0]["parts"]["P6"]["result"]["methods"]["supervised"]
    assert set(rows) == {"eager", "channels_last", "compile", "cuda_graphs", "channels_last+compile"}
    assert "CUDA" in rows["cuda_graphs"]["skipped"]  # the only CUDA-only figure
    for name in ("eager", "channels_last", "compile", "channels_last+compile"):
        assert finite(rows[name]["img_s"]) and finite(rows[name]["loss"])
        assert rows[name]["loss_rel_diff"] < 0.01  # the same training, whatever the option


def test_smoke_markdown_has_a_section_per_part(smoke) -> None:
    report, text = smoke
    for name in sorted(PARTS):
        assert f"## {name}: " in text
    for method in report["parts"]["P1"]["result"]["methods"]:
        assert f"| {method} | " in text
    assert "| supervised | cuda_graphs | skipped: CUDA graphs need a CUDA device" in text


@pytest.fixture
def device_check(monkeypatch):
    """The script as a module. It puts bench/ on sys.path and PYTHONPATH (for Ray workers):
    both are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_part_is_recorded_and_the_others_run(device_check, tmp_path: Path) -> None:
    report = device_check.main(["--smoke", "--out", str(tmp_path), "--parts", "P4,P6",
                          "--p6-methods", "no_such_method"])
    assert report["parts"]["P6"]["status"] == "error"
    assert "no_such_method" in report["parts"]["P6"]["error"]
    assert report["parts"]["P4"]["status"] == "ok"
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["parts"]["P6"]["status"] == "error" and "P1" not in saved["parts"]


def test_no_part_starts_past_the_time_budget(device_check, tmp_path: Path) -> None:
    report = device_check.main(["--smoke", "--out", str(tmp_path), "--parts", "P4,P2", "--budget-s", "0"])
    for name in ("P4", "P2"):
        assert report["parts"][name]["status"] == "skipped"
        assert "--budget-s 0" in report["parts"][name]["error"]
    assert "**skipped**" in (tmp_path / "device_check.md").read_text()
