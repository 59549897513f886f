"""Graph analysis: which (tensor, dim) must change width together, and what blocks growth."""

from .graph import Boundary, Constraint, Group, GrowthGraph, Member
from .propagate import ModuleRule, analyze, register_module_rule
from .trace import meta_copy, trace_with_shapes

__all__ = [
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
