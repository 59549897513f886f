"""Graph analysis: which (tensor, dim) must change width together, and what blocks growth."""

from . import heads as _heads  # noqa: F401  (registers the head_dim constraint, which a replayed plan may carry)
from .activations import (
    ACTIVATIONS,
    Activation,
    activation_of,
    activation_of_function,
    register_activation,
    unregister_activation,
)
from .graph import Boundary, Constraint, Group, GrowthGraph, Member
from .propagate import Propagation, analyze
from .rules import (
    LayerRule,
    ModuleRule,
    batchnorms,
    is_batchnorm,
    register_constraint,
    register_module_rule,
    register_rule,
    rule_for,
    unregister_rule,
)
from .shapeops import register_function_rule
from .trace import meta_copy, trace_with_shapes

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_of",
    "activation_of_function",
    "batchnorms",
    "is_batchnorm",
    "register_activation",
    "unregister_activation",
    "unregister_rule",
    "LayerRule",
    "Propagation",
    "register_constraint",
    "register_function_rule",
    "register_rule",
    "rule_for",
    "Boundary",
    "Constraint",
    "Group",
    "GrowthGraph",
    "Member",
    "ModuleRule",
    "analyze",
    "meta_copy",
    "register_module_rule",
    "trace_with_shapes",
]
