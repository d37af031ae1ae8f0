"""One discovery for both registries (`semiseg.registry.import_modules`): every module of the
package but an explicit skip list is imported, each non-helper module registers an entry, a
stale skip entry is an error; and the config schema loads without any dataset code."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import semiseg.data
import semiseg.methods
from semiseg.data import DATASETS
from semiseg.errors import RegistryError
from semiseg.methods import METHODS
from semiseg.registry import Registry, import_modules


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package `plugins_h2` with two entry modules that register into it and one helper."""
    root = tmp_path / "plugins_h2"
    root.mkdir()
    (root / "__init__.py").write_text("from semiseg.registry import Registry\nITEMS = Registry('item')\n")
    for name in ("alpha", "beta"):
        (root / f"{name}.py").write_text(f"from plugins_h2 import ITEMS\nITEMS.register('{name}')(1)\n")
    (root / "helper.py").write_text("raise RuntimeError('a helper must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m.split(".")[0] == "plugins_h2"]:
        del sys.modules[name]


def test_import_modules_imports_all_but_the_skip_list(package: Path) -> None:
    import plugins_h2

    assert import_modules("plugins_h2", [str(package)], skip={"helper"}) == ["alpha", "beta"]
    assert plugins_h2.ITEMS.names() == ["alpha", "beta"]
    assert "plugins_h2.helper" not in sys.modules


def test_stale_skip_entry_is_an_error(package: Path) -> None:
    with pytest.raises(RegistryError, match=r"plugins_h2: skip list names no module: renamed"):
        import_modules("plugins_h2", [str(package)], skip={"helper", "renamed"})


def _entry_modules(package, skip: set[str]) -> set[str]:
    return {f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
            if m.name not in skip}


@pytest.mark.parametrize("package, skip, registry", [
    (semiseg.data, semiseg.data._NOT_DATASETS, DATASETS),
    (semiseg.methods, semiseg.methods._NOT_METHODS, METHODS),
], ids=["datasets", "methods"])
def test_every_discovered_module_registers(package, skip: set[str], registry: Registry) -> None:
    """Each module outside the skip list is an entry: a new helper module belongs in the list."""
    registered = {registry.get(name).__module__ for name in registry}
    assert registered == _entry_modules(package, skip)


def test_dataset_names_unchanged() -> None:
    assert DATASETS.names() == ["folder", "mni-tissue", "nifti", "nnunet", "synthetic"]


def test_config_schema_imports_no_dataset_code() -> None:
    code = ("import semiseg.config, sys; from semiseg.config import DataConfig; "
            "from semiseg.data_config import DataConfig as D; assert DataConfig is D; "
            "print(sorted(m for m in sys.modules if m.startswith('semiseg.data.') or m == 'semiseg.data'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
