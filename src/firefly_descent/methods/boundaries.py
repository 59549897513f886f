"""The one finder of depth boundaries: the modules after which a growth method may insert a new layer.

Net2Net / random depth and Firefly's depth candidates ask the same question with different filters, so
the filters are parameters: which activations host a layer (the activation registry's `depth_host`, or
`relu_like` for Net2Net's identity layer, which needs inputs >= 0), whether whole blocks count, whether
only the stages of a Sequential/ModuleList count, and whether the module must run once per forward.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..analysis.activations import activation_of
from ..analysis.graph import Boundary, GrowthGraph


def is_relu_like(m: nn.Module | None) -> bool:
    """Outputs >= 0 and ReLU-shaped: an identity-initialised Linear/Conv + ReLU after `m` is exact."""
    act = activation_of(m)
    return act is not None and act.relu_like


def depth_boundaries(
    graph: GrowthGraph,
    model: nn.Module,
    *,
    relu_like: bool = False,
    blocks: bool = False,
    stages: bool = False,
    counts: dict[str, int] | None = None,
    accept: Callable[[Boundary], bool] | None = None,
) -> list[str]:
    """Modules after which a new layer may go, in boundary order, never on a group that reaches the output.

    relu_like: only activations whose outputs are >= 0 (else every activation registered as `depth_host`).
    blocks: modules with children (blocks of layers) count too.
    stages: only elements of a Sequential/ModuleList, one per distinct output tensor, never nested.
    counts: {module: calls per forward}; given, only modules run exactly once count.
    accept: a last check of the boundary (e.g. that a layer spec exists for it).
    """
    ok = {n for n, g in graph.groups.items() if not g.at_output}
    modules = dict(model.named_modules())
    out: list[str] = []
    seen: set[str] = set()
    for b in graph.boundaries.values():
        m = modules.get(b.module)
        if m is None or b.group not in ok:
            continue
        if stages:
            parent = modules.get(b.module.rpartition(".")[0]) if "." in b.module else None
            if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
                continue
        if counts is not None and counts.get(b.module, 0) != 1:
            continue
        act = activation_of(m)
        is_act = act is not None and (act.relu_like if relu_like else act.depth_host)
        is_block = blocks and any(True for _ in m.children())
        if not (is_act or is_block):
            continue
        if stages:
            if b.node in seen or any(b.module.startswith(o + ".") or o.startswith(b.module + ".") for o in out):
                continue
            seen.add(b.node)
        if accept is not None and not accept(b):
            continue
        out.append(b.module)
    return out
