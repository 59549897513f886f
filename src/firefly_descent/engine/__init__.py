"""The engine: the one place that applies plans to live models."""

from .apply import Undo, apply, apply_undoable, growth_history, plan_edits, plan_expansions
from .calibrate import calibrate_new_batchnorm, new_norm_channels, prepare_batchnorm, refresh_batchnorm
from .convenience import add_blocks, deepen, layer_spec, plan_deepen, plan_new_blocks, plan_widen, spread_units, widen
from .history import atomic_save, load, replay_history, resize_to_shapes, save
from .modules import check_attrs

__all__ = [
    "Undo",
    "apply",
    "apply_undoable",
    "atomic_save",
    "calibrate_new_batchnorm",
    "check_attrs",
    "add_blocks",
    "deepen",
    "plan_new_blocks",
    "growth_history",
    "layer_spec",
    "load",
    "new_norm_channels",
    "plan_deepen",
    "plan_edits",
    "plan_expansions",
    "plan_widen",
    "prepare_batchnorm",
    "refresh_batchnorm",
    "replay_history",
    "resize_to_shapes",
    "save",
    "spread_units",
    "widen",
]
