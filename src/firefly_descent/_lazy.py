"""Names a package loads on first use (PEP 562): `import firefly_descent` and `firefly --help` stay torch-free."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, table: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """A module's `__getattr__` and `__dir__` for `table` (name -> relative module); a loaded name is cached
    in `namespace` (the package's globals), so it behaves like an eager import afterwards."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
