"""Per-layer bookkeeping after tensors changed size: module attributes follow tensor shapes.

The knowledge lives in each layer type's rule (`analysis.rules`); this module only asks it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..analysis.rules import rule_for, snapshot_attrs


def restore_attrs(m: nn.Module, attrs: dict[str, Any]) -> None:
    for a, v in attrs.items():
        setattr(m, a, v)


def rederive_attrs(m: nn.Module, before: dict[str, Any]) -> None:
    """Make `in_channels`, `out_features`, `num_features`, `groups`… agree with the module's tensors."""
    rule = rule_for(m)
    if rule is not None:
        rule.rederive(m, before)


def check_attrs(model: nn.Module) -> list[str]:
    """Modules whose attributes disagree with their tensor shapes (empty when consistent)."""
    bad = []
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is not None and not rule.check(m):
            bad.append(name)
    return bad


__all__ = ["check_attrs", "rederive_attrs", "restore_attrs", "snapshot_attrs"]
