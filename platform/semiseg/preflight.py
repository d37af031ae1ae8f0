"""Checks the driver runs once, before any trial or run exists, that look at this machine.

Loading a config stays pure (semiseg.config: types, ranges, registered names), so a Ray worker
can rebuild a trial's Config anywhere; what depends on the driver's disk is checked here, by
`semiseg check`, `semiseg train`/`sweep` (semiseg.distributed.tune.run_sweep) and
`semiseg pseudolabel`. Imports neither Ray nor MLflow.
"""

from __future__ import annotations

from pathlib import Path

from semiseg.config import Config
from semiseg.errors import ConfigError


def check_paths(cfg: Config) -> None:
    """Resolve `data.root` to an absolute path (trials run in other folders) and check that it is
    a folder, so a wrong root stops a sweep before any trial rather than failing every trial in
    turn on the workers. `data.cache_dir` is made absolute the same way."""
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().absolute())
    if not cfg.data.root:
        return
    try:
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    except (RuntimeError, ValueError, OSError) as exc:  # ~nosuchuser/, a NUL byte, ...
        raise ConfigError(f"data.root={cfg.data.root!r}: not a usable path ({exc})") from None
    if not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data.root={cfg.data.root}: no such folder (the {cfg.data.name} dataset's root)")
