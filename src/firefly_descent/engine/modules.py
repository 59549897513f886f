"""Per-layer bookkeeping after tensors changed size: module attributes follow tensor shapes."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..analysis.propagate import MODULE_RULES

_ATTRS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "num_channels",
    "num_groups",
    "normalized_shape",
)


def snapshot_attrs(m: nn.Module) -> dict[str, Any]:
    return {a: getattr(m, a) for a in _ATTRS if hasattr(m, a)}


def restore_attrs(m: nn.Module, attrs: dict[str, Any]) -> None:
    for a, v in attrs.items():
        setattr(m, a, v)


def rederive_attrs(m: nn.Module, before: dict[str, Any]) -> None:
    """Make `in_channels`, `out_features`, `num_features`, `groups`… agree with the module's tensors."""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape[0], m.weight.shape[1]
    elif isinstance(m, nn.modules.conv._ConvNd):
        was_depthwise = before["groups"] > 1 and before["groups"] == before["in_channels"] == before["out_channels"]
        m.out_channels = m.weight.shape[0]
        if was_depthwise:
            m.groups = m.in_channels = m.out_channels
        else:
            m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.GroupNorm):
        per_group = before["num_channels"] // before["num_groups"]
        if m.weight is not None:
            m.num_channels = m.weight.shape[0]
            m.num_groups = m.num_channels // per_group
    elif isinstance(m, nn.LayerNorm):
        ref = m.weight if m.weight is not None else m.bias
        if ref is not None:
            m.normalized_shape = (*tuple(m.normalized_shape)[:-1], ref.shape[-1])
    else:
        rule = next((r for t, r in MODULE_RULES.items() if isinstance(m, t)), None)
        if rule is not None and rule.rederive is not None:
            rule.rederive(m)


def check_attrs(model: nn.Module) -> list[str]:
    """Modules whose attributes disagree with their tensor shapes (empty when consistent)."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and tuple(m.weight.shape) != (m.out_features, m.in_features):
            bad.append(name)
        elif isinstance(m, nn.modules.conv._ConvNd) and (
            m.weight.shape[0] != m.out_channels or m.weight.shape[1] * m.groups != m.in_channels
        ):
            bad.append(name)
        elif (
            isinstance(m, nn.modules.batchnorm._NormBase)
            and m.running_mean is not None
            and (m.running_mean.shape[0] != m.num_features)
        ):
            bad.append(name)
        elif (
            isinstance(m, nn.GroupNorm)
            and m.weight is not None
            and (m.weight.shape[0] != m.num_channels or m.num_channels % m.num_groups)
        ):
            bad.append(name)
        elif (
            isinstance(m, nn.LayerNorm) and m.weight is not None and tuple(m.weight.shape) != tuple(m.normalized_shape)
        ):
            bad.append(name)
    return bad
