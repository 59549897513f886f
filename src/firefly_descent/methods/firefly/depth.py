"""Firefly's new layers outside the optimisation: where they may go by default, how a kept layer's trained
weights are reshaped when the group it sits on (or the block it copies) also widens in the same plan, what a
selection adds exactly in parameters, and the report's depth summary.

Kept apart from `descent.py` so the grower there holds only the decision (step one, step two, selection);
everything here is weight surgery and bookkeeping on the plan's new layers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ...analysis.graph import Group
from ...budget import Candidate
from ...cost import plan_cost
from ...engine import apply
from ...layers import body_members, build_body
from ...plan import GroupChange, NewLayer, NewUnits, Plan, Split
from ..boundaries import depth_boundaries
from .candidates import block_size
from .depth_candidates import DepthCandidates


def _widen_body(spec: dict[str, Any], params: dict[str, torch.Tensor], change: GroupChange) -> tuple[dict, dict]:
    """A kept new layer sits on a group that also grows: widen its body with the same unit changes
    (twins copied, inputs halved, new units zero) so it acts on the grown group as it did before."""
    body = build_body(spec)
    body.load_state_dict(params)
    group = Group("body", change.group.width, body_members(spec))
    plan = Plan(
        [
            GroupChange(
                group,
                splits=[Split(s.unit, position=s.position) for s in change.splits],
                new=NewUnits(change.new.count, positions=change.new.positions) if change.new else None,
            )
        ],
        function_preserving=False,
    )
    apply(body, plan, verify=False, record=False)
    new_spec = dict(spec)
    key = "channels" if "channels" in spec else "features"
    new_spec[key] = int(spec[key]) + change.added
    return new_spec, {k: v.detach().clone() for k, v in body.state_dict().items()}


def _layer_kind(spec: dict[str, Any]) -> str:
    return "copy" if spec.get("type") == "copy" else "residual"


def _widen_copy(
    source: nn.Module, after: str, params: dict[str, torch.Tensor], changes: list[GroupChange]
) -> dict[str, torch.Tensor]:
    """A kept new block is copied from block `after` (`source`, as it was) once the plan's width changes are
    applied: give its trained values the same changes on the block's own tensors (twins copied, inputs
    halved, new units zero), so it acts on the grown model as it did in the over-grown one."""
    prefix = after + "."
    inner = []
    for change in changes:
        members = [
            dataclasses.replace(m, tensor=m.tensor[len(prefix) :], module=m.module[len(prefix) :])
            for m in change.group.members
            if m.tensor.startswith(prefix)
        ]
        if members:
            # the block's own constraints come along (its heads, its norms), so a completion the grown model's
            # blocks get (a normalised stream's mean rows and rescaled norms) is given to the copy too
            constraints = [
                dataclasses.replace(c, module=c.module[len(prefix) :])
                for c in change.group.constraints
                if c.module.startswith(prefix)
            ]
            group = Group(change.group.name, change.group.width, members, constraints)
            inner.append(
                GroupChange(
                    group,
                    splits=[Split(s.unit, position=s.position) for s in change.splits],
                    new=NewUnits(change.new.count, positions=change.new.positions) if change.new else None,
                )
            )
    if not inner:
        return params
    block = copy.deepcopy(source)
    block.load_state_dict(params)
    apply(block, Plan(inner, function_preserving=False), verify=False, record=False)
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def default_depth_boundaries(graph: Any, model: nn.Module) -> list[str]:
    """Where new layers may go by default: after each block or activation that is an element of a
    Sequential/ModuleList (the stages of the network), one per distinct output tensor, never nested,
    never on a group that reaches the model output."""
    return depth_boundaries(graph, model, blocks=True, stages=True)


def exact_added_params(
    model: nn.Module,
    graph: Any,
    depth_c: DepthCandidates | None,
    kept: list[Candidate],
    blocks: dict[str, int] | None = None,
) -> int:
    """Parameters the selection `kept` adds to `model`: its structure's plan (new blocks widened with the
    group they sit on, as `_widen_body` does), costed from the grown shapes (`cost.plan_cost`). `blocks`:
    new units per "head" candidate (`WidthCandidates.blocks`; default `block_size`)."""
    added: dict[str, int] = {}
    for c in kept:
        if c.kind in ("split", "new", "head"):
            per = (blocks or {}).get(c.group) or block_size(graph[c.group]) or 1
            added[c.group] = added.get(c.group, 0) + (per if c.kind == "head" else 1)
    changes = [GroupChange(graph[g], new=NewUnits(n)) for g, n in added.items()]
    layers = []
    for c in kept:
        if c.kind == "layer" and depth_c is not None and depth_c.specs[c.index]["type"] == "copy":
            layers.append(NewLayer(c.group, "copy", dict(depth_c.specs[c.index])))  # copied after widening
        elif c.kind == "layer" and depth_c is not None:
            spec = dict(depth_c.specs[c.index])
            key = "channels" if "channels" in spec else "features"
            spec[key] = int(spec[key]) + added.get(graph.boundaries[c.group].group or "", 0)
            layers.append(NewLayer(c.group, "residual", spec))
    return plan_cost(model, Plan(changes, layers, function_preserving=False), None, graph, flops=False).params


def depth_summary(candidates: list[Candidate], kept: list[Candidate], depth_c: DepthCandidates) -> dict[str, Any]:
    """Which blocks competed and were inserted, each with its score per cost, and the share of the spent
    budget that went to depth (in the budget's currency)."""
    chosen = {(c.kind, c.group, c.index) for c in kept}
    blocks = [
        {
            "after": c.group,
            "type": depth_c.specs[c.index].get("type"),
            "score": c.score,
            "cost": c.cost,
            "score_per_cost": c.score / c.cost,
            "kept": ("layer", c.group, c.index) in chosen,
        }
        for c in candidates
        if c.kind == "layer"
    ]
    width = [c for c in candidates if c.kind != "layer" and c.score < 0]
    spent_depth = sum(c.cost for c in kept if c.kind == "layer")
    spent = sum(c.cost for c in kept)
    return {
        "blocks": blocks,
        "best_width_score_per_cost": min((c.score / c.cost for c in width), default=None),
        "spent_depth": spent_depth,
        "spent_total": spent,
        "depth_share": spent_depth / spent if spent else 0.0,
    }
