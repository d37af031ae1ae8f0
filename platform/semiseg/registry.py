"""A tiny name -> object registry that refuses duplicates and lists choices on a miss, and the
one way registries find their entries: every module of a package, minus a skip list."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Collection, Generic, Iterable, Iterator, TypeVar

from semiseg.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects, e.g. method classes or dataset builders."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_modules(package: str, path: Iterable[str], skip: Collection[str]) -> list[str]:
    """Import every module of a package except those in `skip`, so that each registers itself
    the moment its file exists (methods, datasets). Returns the imported module names.

    `skip` names the package's helper modules; a name there that is no module of the package
    is an error, so the list cannot go stale when a helper is renamed.
    """
    names = [info.name for info in pkgutil.iter_modules(list(path))]
    stale = sorted(set(skip) - set(names))
    if stale:
        raise RegistryError(f"{package}: skip list names no module: {', '.join(stale)} "
                            f"(modules: {', '.join(names)})")
    imported = [name for name in names if name not in skip]
    for name in imported:
        importlib.import_module(f"{package}.{name}")
    return imported
