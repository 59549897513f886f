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


def attr_owners(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """The ancestors of the modules `names` (not among them) whose rule re-derives attributes from their
    children (an attention module whose head count follows its projections: GPT-2's `split_size`), deepest
    first: re-derive them after the children so they see the children's new attributes."""
    owners: dict[str, nn.Module] = {}
    done = set(names)
    for name in names:
        parts = name.split(".") if name else []
        for i in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:i])
            if parent in done or parent in owners:
                continue
            module = model.get_submodule(parent) if parent else model
            rule = rule_for(module)
            if rule is not None and rule.attrs:
                owners[parent] = module
    return sorted(owners.items(), key=lambda item: -len(item[0].split(".")))


def check_attrs(model: nn.Module) -> list[str]:
    """Modules whose attributes disagree with their tensor shapes (empty when consistent)."""
    bad = []
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is not None and not rule.check(m):
            bad.append(name)
    return bad


__all__ = ["attr_owners", "check_attrs", "rederive_attrs", "restore_attrs", "snapshot_attrs"]
