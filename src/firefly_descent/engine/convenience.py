"""Function-preserving growth in one call, on top of plans: `widen` and `deepen`."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from ..analysis import GrowthGraph, analyze
from ..analysis.graph import Boundary
from ..analysis.rules import is_post_norm, rule_for
from ..errors import ApproximationRequiredError, GrowthError
from ..plan import GroupChange, NewLayer, NewUnits, Plan, Split
from .apply import apply


def _linear_map(m: nn.Module) -> bool:
    """Whether `m` is a linear map of its input by its weight (its rule's `linear_map`: Linear, Conv)."""
    rule = rule_for(m)
    return rule is not None and rule.linear_map

def spread_units(width: int, k: int) -> list[int]:
    """k units to split, spread evenly over the group (cycling when k > width)."""
    return [(i * width) // k % width if k <= width else i % width for i in range(k)]


def plan_widen(graph: GrowthGraph, sizes: dict[str, int], mode: str = "split", approximate: bool = False) -> Plan:
    """A function-preserving plan adding `sizes[group]` units to each group."""
    if mode not in ("split", "zero"):
        raise GrowthError(f"widen mode must be 'split' or 'zero', not {mode!r}")
    changes = []
    for name, k in sizes.items():
        group = graph[name]
        group.check_growable()
        if k < 0:
            raise GrowthError(f"cannot widen group {name!r} by {k} units")
        blocks = any(c.channels_per_group > 1 for c in group.constraints)  # GroupNorm, grouped conv, heads
        if mode == "split":
            units = list(range(k)) if blocks else spread_units(group.width, k)
            changes.append(GroupChange(group, splits=[Split(u) for u in sorted(units)]))
        else:
            changes.append(GroupChange(group, new=NewUnits(k, init="random")))
    return Plan(
        changes,
        function_preserving=True,
        approximate=approximate,
        method=f"widen-{mode}",
        input_shapes=[list(s) for s in graph.input_shapes],
    )


def widen(
    model: nn.Module,
    example_inputs: Any,
    sizes: dict[str, int],
    mode: str = "split",
    optimizer: torch.optim.Optimizer | None = None,
    approximate: bool = False,
    exclude: list[str] | None = None,
) -> Plan:
    """Add k units to each named group: Net2Net splits (mode="split") or new units with random incoming
    and zero outgoing weights (mode="zero"). The function is preserved; returns the applied plan. `exclude`: submodules
    the analysis treats as opaque (`analyze(exclude=...)`)."""
    graph = analyze(model, example_inputs, exclude=exclude)
    plan = plan_widen(graph, sizes, mode, approximate)
    if approximate:
        plan.function_preserving = False
    apply(model, plan, optimizer, example_inputs)
    return plan


def layer_spec(boundary: Boundary, kind: str = "residual", kernel_size: int = 3) -> dict[str, Any]:
    """The spec of a new layer fitting a boundary's output (conv over channels or linear over features)."""
    if boundary.channel_dim == boundary.ndim - 1 and boundary.ndim != 3 or boundary.ndim == 2:
        return {"type": "linear_act" if kind == "residual" else "linear_identity", "features": boundary.channels}
    if boundary.channel_dim == 1 and boundary.ndim in (3, 4, 5):
        return {
            "type": "conv_bn_act" if kind == "residual" else "conv_identity",
            "channels": boundary.channels,
            "dims": boundary.ndim - 2,
            "kernel_size": kernel_size,
        }
    if boundary.channel_dim == boundary.ndim - 1:
        return {"type": "linear_act" if kind == "residual" else "linear_identity", "features": boundary.channels}
    raise GrowthError(f"no new-layer type fits the output of {boundary.module!r} (shape {boundary.shape})")


def plan_deepen(graph: GrowthGraph, after: list[str], kind: str = "residual", scale: float = 0.0) -> Plan:
    layers = []
    for name in after:
        b = graph.boundaries.get(name)
        if b is None:
            raise GrowthError(
                f"cannot insert a layer after {name!r}: it is not a module whose output carries one group's units; "
                f"candidates: {', '.join(list(graph.boundaries)[:12])}"
            )
        layers.append(NewLayer(name, kind, layer_spec(b, kind), scale=scale))
    return Plan(
        layers=layers,
        function_preserving=True,
        method=f"deepen-{kind}",
        input_shapes=[list(s) for s in graph.input_shapes],
    )


def deepen(
    model: nn.Module,
    example_inputs: Any,
    after: list[str],
    optimizer: torch.optim.Optimizer | None = None,
    kind: str = "residual",
    exclude: list[str] | None = None,
) -> Plan:
    """Insert identity-at-init layers after the named modules: `z + 0·h(z)` (residual, default) or
    Net2Net identity-initialised conv/linear + ReLU (kind="identity", needs non-negative inputs). `exclude`: as
    for `widen`."""
    graph = analyze(model, example_inputs, exclude=exclude)
    plan = plan_deepen(graph, after, kind)
    apply(model, plan, optimizer, example_inputs)
    return plan


def plan_new_blocks(graph: GrowthGraph, model: nn.Module, after: list[str]) -> Plan:
    """New blocks copied from the named residual blocks, identity at insertion: in each copy, the layers
    that write the block's output group (its residual branches' last Linear/Conv, or the output projection
    of an attention module with a rule of its own) start at zero. A tensor producing the group in several
    slices (nn.MultiheadAttention's q/k/v rows, tied to the stream's width) is not an output."""
    layers = []
    for name in after:
        b = graph.boundaries.get(name)
        if b is None or b.group is None:
            raise GrowthError(f"cannot copy block {name!r}: its output does not carry one group's units")
        if is_post_norm(model.get_submodule(name)):
            raise ApproximationRequiredError(
                f"cannot copy block {name!r} as the identity: it normalises after its residual add (post-norm), so a "
                "copy with zero branches still renormalises the stream (insert after a pre-norm block)"
            )
        producers = [m for m in graph[b.group].members if m.role == "producer" and m.module.startswith(name + ".")]
        slices = Counter(m.tensor for m in producers)
        zero = sorted(
            {
                m.tensor[len(name) + 1 :]
                for m in producers
                if _linear_map(model.get_submodule(m.module))
                or (m.kind in ("weight", "bias") and slices[m.tensor] == 1)
            }
        )
        if not zero:
            raise GrowthError(f"cannot copy block {name!r}: no Linear/Conv inside it writes its output")
        layers.append(NewLayer(name, "copy", {"type": "copy", "zero": zero}))
    return Plan(
        layers=layers, function_preserving=True, method="new-blocks", input_shapes=[list(s) for s in graph.input_shapes]
    )


def add_blocks(
    model: nn.Module,
    example_inputs: Any,
    after: list[str],
    optimizer: torch.optim.Optimizer | None = None,
    exclude: list[str] | None = None,
) -> Plan:
    """Grow depth by whole blocks: after each named (pre-norm residual) block insert a copy of it whose
    residual branches output zero, so the function is unchanged; returns the applied plan."""
    plan = plan_new_blocks(analyze(model, example_inputs, exclude=exclude), model, after)
    apply(model, plan, optimizer, example_inputs)
    return plan
