"""The engine: the one place that applies plans to live models."""

from .apply import apply, growth_history, plan_edits, plan_expansions
from .convenience import deepen, layer_spec, plan_deepen, plan_widen, spread_units, widen
from .history import atomic_save, load, replay_history, resize_to_shapes, save
from .modules import check_attrs

__all__ = [
    "apply",
    "atomic_save",
    "check_attrs",
    "deepen",
    "growth_history",
    "layer_spec",
    "load",
    "plan_deepen",
    "plan_edits",
    "plan_expansions",
    "plan_widen",
    "replay_history",
    "resize_to_shapes",
    "save",
    "spread_units",
    "widen",
]
