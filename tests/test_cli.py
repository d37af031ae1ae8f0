"""The `semiseg` command as a user runs it: a real subprocess, real exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def semiseg(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semiseg.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["train"], ["sweep"], ["report"], ["methods"], ["datasets"]])
def test_help(command: list[str]) -> None:
    out = semiseg(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: semiseg" in out.stdout


def test_methods_lists_registry() -> None:
    from semiseg.methods import METHODS

    out = semiseg("methods")
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.splitlines()]
    assert listed == METHODS.names()


def test_datasets_lists_registry() -> None:
    out = semiseg("datasets")
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"synthetic", "mni-tissue", "folder", "nifti"} <= set(names)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sweep", "does/not/exist.yaml"], "config file not found"),
        (["train", "experiments/quickstart.yaml", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["sweep", "experiments/quickstart.yaml", "data.name=nope"], "unknown dataset 'nope'"),
        (["sweep", "experiments/quickstart.yaml", "sweep.methods=[nope]"], "unknown method 'nope'"),
        (["sweep", "experiments/quickstart.yaml", "data.label_fraction=1.5"], "(0, 1]"),
        (["sweep", "experiments/quickstart.yaml", "data.batch_size=0"], "positive"),
        (["sweep", "experiments/quickstart.yaml", "epochs"], "expected key=value"),
    ],
)
def test_bad_input_exits_2_with_clear_message(args: list[str], expected: str) -> None:
    out = semiseg(*args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    """A rejected config fails before any run, Ray session or store is created."""
    out = semiseg("sweep", str(REPO / "experiments" / "quickstart.yaml"), "train.epochs=0", cwd=tmp_path)
    assert out.returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_pseudolabel_without_a_coarse_model_is_a_clear_error() -> None:
    out = semiseg("pseudolabel", "experiments/sam_refined.yaml", "sam.model_type=tiny")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no coarse model: set sam.coarse_checkpoint" in out.stderr


def test_pseudolabel_with_a_missing_checkpoint_names_it(tmp_path: Path) -> None:
    out = semiseg("pseudolabel", "experiments/sam_refined.yaml", "sam.model_type=tiny",
                  f"--checkpoint={tmp_path / 'nope'}")
    assert out.returncode == 2
    assert f"coarse model checkpoint not found: {tmp_path / 'nope'} (sam.coarse_checkpoint or --checkpoint)" in out.stderr
