"""firefly-descent: grow PyTorch networks during training with Firefly Neural Architecture Descent.

model -> `analyze` -> `Plan` -> `apply` -> grown model; every growth method only writes plans.
"""

from .analysis import GrowthGraph, ModuleRule, analyze, register_module_rule
from .engine import (
    apply,
    calibrate_new_batchnorm,
    deepen,
    growth_history,
    load,
    new_norm_channels,
    replay_history,
    save,
    widen,
)
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
from .plan import GroupChange, NewBranch, NewLayer, NewUnits, Plan, Split

__version__ = "0.1.0"

__all__ = [
    "ApproximationRequiredError",
    "DataDependentControlFlowError",
    "FrozenGroupError",
    "GroupChange",
    "GrowthError",
    "GrowthGraph",
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
    "deepen",
    "growth_history",
    "load",
    "new_norm_channels",
    "register_module_rule",
    "replay_history",
    "save",
    "widen",
]
