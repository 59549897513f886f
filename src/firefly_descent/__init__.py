"""firefly-descent: grow PyTorch networks during training with Firefly Neural Architecture Descent.

model -> `analyze` -> `Plan` -> `apply` -> grown model; every growth method only writes plans.

Names are imported on first use (PEP 562), so ``import firefly_descent`` and ``firefly --help`` do not
load torch; ``firefly_descent.widen`` etc. behave exactly like eager imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from .errors import (
    ApproximationRequiredError,
    DataDependentControlFlowError,
    FrozenGroupError,
    GrowthError,
    PlanError,
    ReductionOverGrownDimError,
    UnsupportedOpError,
    VerificationError,
)

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .analysis import GrowthGraph, LayerRule, ModuleRule, analyze, register_module_rule, register_rule
    from .engine import (
        add_blocks,
        apply,
        calibrate_new_batchnorm,
        deepen,
        growth_history,
        load,
        new_norm_channels,
        prepare_batchnorm,
        refresh_batchnorm,
        replay_history,
        save,
        widen,
    )
    from .exporting import export_model, load_export
    from .methods import make_grower
    from .plan import GroupChange, NewBranch, NewLayer, NewUnits, Plan, Split

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("GrowthGraph", "LayerRule", "ModuleRule", "analyze", "register_module_rule", "register_rule"), ".analysis"
    ),
    **dict.fromkeys(
        (
            "add_blocks",
            "apply",
            "calibrate_new_batchnorm",
            "deepen",
            "growth_history",
            "load",
            "new_norm_channels",
            "prepare_batchnorm",
            "refresh_batchnorm",
            "replay_history",
            "save",
            "widen",
        ),
        ".engine",
    ),
    **dict.fromkeys(("export_model", "load_export"), ".exporting"),
    "make_grower": ".methods",  # the growers by name (firefly, random, net2net, tiny, ...)
    **dict.fromkeys(("GroupChange", "NewBranch", "NewLayer", "NewUnits", "Plan", "Split"), ".plan"),
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__all__ = [
    "ApproximationRequiredError",
    "DataDependentControlFlowError",
    "FrozenGroupError",
    "GroupChange",
    "GrowthError",
    "GrowthGraph",
    "LayerRule",
    "ModuleRule",
    "NewBranch",
    "NewLayer",
    "NewUnits",
    "Plan",
    "PlanError",
    "ReductionOverGrownDimError",
    "Split",
    "UnsupportedOpError",
    "VerificationError",
    "analyze",
    "apply",
    "calibrate_new_batchnorm",
    "add_blocks",
    "deepen",
    "export_model",
    "growth_history",
    "load",
    "load_export",
    "make_grower",
    "new_norm_channels",
    "prepare_batchnorm",
    "refresh_batchnorm",
    "register_module_rule",
    "register_rule",
    "replay_history",
    "save",
    "widen",
]
