"""`firefly search`: cell-based architecture search (Firefly, DARTS, random) from a config, resumable.

Names load on first use (PEP 562), so `firefly --help`, which registers the `search` subcommand from
`search.cli`, does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

_LAZY = {
    "SearchConfig": ".config",
    "load_search_config": ".config",
    "draw_cell": ".draw",
    "run_search": ".runner",
    "run_seed": ".runner",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
