"""`firefly search`: cell-based architecture search (Firefly, DARTS, random) from a config, resumable.

Names load on first use (PEP 562), so `firefly --help`, which registers the `search` subcommand from
`search.cli`, does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SearchConfig": ".config",
    "load_search_config": ".config",
    "draw_cell": ".draw",
    "run_search": ".runner",
    "run_seed": ".runner",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
