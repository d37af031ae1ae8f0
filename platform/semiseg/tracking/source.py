"""Where a run's code came from, as the tags MLflow's UI reads: the Source column
(`mlflow.source.name` / `mlflow.source.type`), the Version column (`mlflow.source.git.commit`),
the git dirty flag and branch, and `semiseg.version`.

The git facts are those of the checkout holding the semiseg package that runs (not of the
current directory); outside a git checkout (an installed wheel, a Ray job's uploaded copy) the
git tags are simply absent. git runs with a list argv, never through a shell.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

import semiseg

VERSION_TAG = "semiseg.version"
# The tags a trial copies from its sweep, so a trial started on another node (where the package
# may not sit in a git checkout) still names the code its sweep ran.
SOURCE_TAGS = (MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY,
               MLFLOW_GIT_BRANCH, VERSION_TAG)


def _git(folder: Path, *args: str) -> str | None:
    """git's stdout in `folder`, or None when git is missing, slow or says no (not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """Commit, dirty flag (tracked files changed, as MLflow's own git context reads it) and
    branch of the checkout holding the semiseg package; {} outside a git checkout."""
    package = Path(semiseg.__file__).resolve().parent
    commit = _git(package, "rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git(package, "status", "--porcelain", "--untracked-files=no")
    tags = {MLFLOW_GIT_COMMIT: commit}
    if status is not None:
        tags[MLFLOW_GIT_DIRTY] = str(bool(status)).lower()
    branch = _git(package, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":  # "HEAD" means a detached checkout: no branch to name
        tags[MLFLOW_GIT_BRANCH] = branch
    return tags


def entry_point(argv: list[str] | None = None) -> str:
    """What ran, for the Source column: `semiseg sweep` for the CLI (installed script or
    `python -m semiseg.cli`), else the script's file name, as MLflow names a script run."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]) if argv and argv[0] not in ("", "-", "-c") else Path("python")
    program = script.parent.name if script.name == "__main__.py" else script.name  # python -m X
    if program in ("semiseg", "cli.py") and len(argv) > 1 and not argv[1].startswith("-"):
        return f"semiseg {argv[1]}"
    return program


def source_tags() -> dict[str, str]:
    """The tags above for a run this process creates."""
    return {MLFLOW_SOURCE_NAME: entry_point(), MLFLOW_SOURCE_TYPE: "LOCAL",
            VERSION_TAG: semiseg.__version__, **git_tags()}
