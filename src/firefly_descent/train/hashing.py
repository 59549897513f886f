"""Whether the ranks of a job hold the same model: an architecture digest, and the errors when they do not."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..errors import GrowthError

__all__ = ["ArchitectureMismatchError", "PlanMismatchError", "architecture_hash"]


class ArchitectureMismatchError(GrowthError):
    """The ranks of a job hold different architectures (they did not apply the same plans)."""


class PlanMismatchError(ArchitectureMismatchError):
    """The ranks of a job computed different growth plans from their shards (a reduction is missing)."""


def architecture_hash(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """Short digest of the architecture: module names and types, every parameter/buffer's name, shape and
    dtype, and (if given) the optimizer's param-group sizes and per-parameter state keys and shapes."""
    desc: list[Any] = [[n, type(m).__name__] for n, m in model.named_modules()]
    desc += [[n, list(t.shape), str(t.dtype)] for n, t in model.state_dict().items()]
    if optimizer is not None:
        for group in optimizer.param_groups:
            desc.append(len(group["params"]))
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                desc.append(sorted([k, list(v.shape) if isinstance(v, torch.Tensor) else None] for k, v in st.items()))
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]
