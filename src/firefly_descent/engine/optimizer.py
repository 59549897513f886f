"""Carry optimizer state across growth: old entries keep their values at their new positions,
new entries start at zero, step counts are kept, param groups point at the new parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tensors import Expansion, remap_state


def snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[list[Any]], dict[Any, Any]]:
    return [list(g["params"]) for g in optimizer.param_groups], dict(optimizer.state)


def restore(optimizer: torch.optim.Optimizer, snap: tuple[list[list[Any]], dict[Any, Any]]) -> None:
    params, state = snap
    for g, p in zip(optimizer.param_groups, params):
        g["params"] = p
    optimizer.state.clear()
    optimizer.state.update(state)


def replace_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, maps: list[Expansion]
) -> None:
    for g in optimizer.param_groups:
        g["params"] = [new if p is old else p for p in g["params"]]
    if old in optimizer.state:
        st = optimizer.state.pop(old)
        optimizer.state[new] = {
            k: remap_state(v, maps) if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0 else v
            for k, v in st.items()
        }


def add_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], near: nn.Module | None) -> None:
    """Register new parameters in the param group that holds `near`'s parameters (else the first group)."""
    target = optimizer.param_groups[0]
    if near is not None:
        ids = {id(p) for p in near.parameters()}
        for g in optimizer.param_groups:
            if any(id(p) in ids for p in g["params"]):
                target = g
                break
    target["params"] = list(target["params"]) + [p for p in params if p.requires_grad]
