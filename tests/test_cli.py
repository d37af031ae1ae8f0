"""The `semiseg` command as a user runs it: real exit codes and messages, from a real subprocess
where the process matters (output, imports, files), and from `main()` in this process for the
many bad-input cases (each subprocess costs seconds of imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def semiseg(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semiseg.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `semiseg ARGS` run through `main()` here."""
    from semiseg.cli import main

    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's --help and usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_from_a_real_process() -> None:
    out = semiseg("--help")
    assert out.returncode == 0, out.stderr
    assert "usage: semiseg" in out.stdout


@pytest.mark.parametrize("command", [["check"], ["train"], ["sweep"], ["report"], ["methods"], ["datasets"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, err = in_process([*command, "--help"], capsys)
    assert code == 0, err
    assert "usage: semiseg" in out


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


def test_datasets_prepare_fills_the_cache_every_trial_then_maps(tmp_path: Path) -> None:
    """A relative data.cache_dir is made absolute (trials run in other folders)."""
    args = ("datasets", "--prepare", str(REPO / "experiments" / "quickstart.yaml"), "data.num_images=20",
            "data.image_size=16", "data.cache_dir=cache")
    out = semiseg(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    folder = next((tmp_path / "cache").glob("synthetic-*[!k]"))  # not the .lock
    assert "synthetic: 20 images (16, 16)" in out.stdout and str(folder) in out.stdout
    assert (folder / "manifest.json").is_file()
    off = semiseg(*args, "data.cache=false", cwd=tmp_path)
    assert off.returncode == 2 and "data.cache=false: nothing to prepare" in off.stderr
    stray = semiseg("datasets", "data.image_size=16")
    assert stray.returncode == 2 and "without --prepare CONFIG" in stray.stderr


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
        (["check", "experiments/sam_refined.yaml", "method.params.rounds=0"],
         "method.params.rounds=0: expected an integer >= 1"),
        (["check", "experiments/quickstart.yaml", "sweep.methods=[supervised,sam_refined]",
          "sweep.params={sam_refined.rounds: [1, 0]}"], "method.params.rounds=0: expected an integer >= 1"),
        (["check", "experiments/quickstart.yaml", "data.name=folder", "data.root=no/such/dir"],
         f"data.root={REPO / 'no/such/dir'}: no such folder"),
    ],
)
def test_bad_input_exits_2_with_clear_message(args: list[str], expected: str, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, _, err = in_process(args, capsys)  # an uncaught exception would fail the test here
    assert code == 2
    assert expected in err


def test_bad_input_from_a_real_process_has_no_traceback() -> None:
    out = semiseg("sweep", "experiments/quickstart.yaml", "data.name=nope")
    assert out.returncode == 2
    assert "unknown dataset 'nope'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=0", "train.epochs=0"),
    ("method.params.rounds=0", "method.params.rounds=0"),  # the method's params, in range
    ("sweep.params={sam_refined.rounds: [1, 0]}", "method.params.rounds=0"),  # every grid value
])
def test_bad_input_writes_nothing(tmp_path: Path, override: str, expected: str, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejected config fails before any run, Ray session or store (./mlruns) is created."""
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(["sweep", str(REPO / "experiments" / "sam_refined.yaml"), override], capsys)
    assert code == 2 and expected in err
    assert list(tmp_path.iterdir()) == []


_CHECK_IN_PROCESS = """
import contextlib, io, json, sys
from semiseg.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["check", "experiments/sam_refined.yaml", "method.params.rounds=2"])
print(json.dumps({"code": code, "stdout": out.getvalue(),
                  "imported": [m for m in ("ray", "mlflow") if m in sys.modules]}))
"""


def test_check_prints_the_resolved_config_and_its_hash_without_ray_or_mlflow() -> None:
    import json

    import yaml

    from semiseg.config import from_dict, load_config

    proc = subprocess.run([sys.executable, "-c", _CHECK_IN_PROCESS], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["imported"] == []
    expected = load_config(REPO / "experiments" / "sam_refined.yaml", ["method.params.rounds=2"])
    printed = yaml.safe_load(result["stdout"])  # the hash and stages are YAML comments
    assert from_dict(printed) == expected  # the printed config is the resolved one, loadable
    assert f"# config_hash: {expected.config_hash()}" in result["stdout"]
    assert "round1 (train sam_refined)" in result["stdout"]  # the chain it would run


def test_pseudolabel_without_a_coarse_model_is_a_clear_error() -> None:
    out = semiseg("pseudolabel", "experiments/sam_refined.yaml", "sam.model_type=tiny")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no coarse model: set sam.coarse_checkpoint" in out.stderr


def test_pseudolabel_with_a_missing_checkpoint_names_it(tmp_path: Path) -> None:
    out = semiseg("pseudolabel", "experiments/sam_refined.yaml", "sam.model_type=tiny",
                  f"--checkpoint={tmp_path / 'nope'}")
    assert out.returncode == 2
    assert f"coarse model checkpoint not found: {tmp_path / 'nope'} (sam.coarse_checkpoint or --checkpoint)" in out.stderr
