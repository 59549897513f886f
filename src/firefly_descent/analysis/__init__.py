"""Graph analysis: which (tensor, dim) must change width together, and what blocks growth."""

from .graph import Boundary, Constraint, Group, GrowthGraph, Member
from .propagate import Propagation, analyze
from .rules import (
    ACTIVATIONS,
    LayerRule,
    ModuleRule,
    register_constraint,
    register_module_rule,
    register_rule,
    rule_for,
)
from .shapeops import register_function_rule
from .trace import meta_copy, trace_with_shapes

__all__ = [
    "ACTIVATIONS",
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
