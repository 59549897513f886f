"""Small shared helpers for the reference architectures.

Kept separate so every model uses the same activation names and the same
initialisation, which makes growth experiments comparable across models.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..analysis.activations import activation_module, activation_names


def make_activation(name: str) -> nn.Module:
    """Build a fresh standard activation module from its short name.

    A new module per use keeps each activation a distinct graph node, which the
    growth analysis relies on to track channels through it.
    """
    try:
        return activation_module(name.lower())()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {activation_names()}") from None


def scale_width(channels: int, multiplier: float) -> int:
    """Scale a standard channel count, never below one unit."""
    return max(1, int(round(channels * multiplier)))


def resolve_widths(
    n: int,
    defaults: Sequence[int],
    widths: int | Sequence[int] | None,
    width_multiplier: float,
    what: str,
) -> list[int]:
    """Turn the width knobs (uniform int, explicit list, or multiplier) into a list of `n` widths."""
    if widths is None:
        return [scale_width(c, width_multiplier) for c in defaults]
    if isinstance(widths, int):
        if widths < 1:
            raise ValueError(f"{what}: width must be >= 1, got {widths}")
        return [widths] * n
    out = [int(w) for w in widths]
    if len(out) != n:
        raise ValueError(f"{what}: expected {n} widths, got {len(out)}")
    if any(w < 1 for w in out):
        raise ValueError(f"{what}: widths must be >= 1, got {out}")
    return out


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal convs, unit/zero norms, default Linear init.

    Deterministic given the torch seed; no norm gain is zeroed because a zero
    gain would hide new units from gradient-based growth scores.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
