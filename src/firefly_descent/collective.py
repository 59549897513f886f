"""The reduction hook growth methods call so that N processes reach one growth decision.

Under torch.distributed every rank holds a different shard of the growth data. A grower that
supports this (``sharded_growth = True``) computes its statistics on its own shard and combines them
through `current_sync()` at the few places where data enters a decision: gradients on candidate
parameters, candidate scores, held-out losses, BatchNorm statistics. Every rank then holds the same
numbers, so it computes the same plan.

In one process `current_sync()` is `GrowthSync`, whose hooks return their input untouched (no copy,
no communication). The training runtime installs a distributed implementation for the duration of a
growth step with `sync_growth` (`train/distributed.py`); nothing else changes for the grower.

Every hook is a collective: all ranks must call it in the same order with tensors of the same shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .analysis.rules import is_batchnorm

__all__ = ["GrowthSync", "current_sync", "plan_digest", "sync_growth"]


class GrowthSync:
    """One process: every hook is the identity. Subclasses reduce over processes (see module doc)."""

    world_size = 1
    rank = 0

    @property
    def active(self) -> bool:
        """True when statistics are combined over more than one process."""
        return self.world_size > 1

    def share(self, n: int | None) -> int | None:
        """This rank's part of a global sample count `n` (ceil(n / world)): sample-count caps apply to the
        union of the shards, so the ranks together read what one process reads."""
        return n if n is None or self.world_size == 1 else -(-int(n) // self.world_size)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over processes."""
        return t

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        """Python numbers summed over processes (a loss total and its sample count)."""
        return tuple(float(v) for v in values)

    def mean(self, t: torch.Tensor, weight: float) -> torch.Tensor:
        """Σ_r w_r t_r / Σ_r w_r: the mean over all samples of per-rank means over `weight` samples."""
        return t

    def mean_dict(self, tensors: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
        """`mean` of every tensor of a dict, in one reduction."""
        if not self.active or not tensors:
            return tensors
        keys = list(tensors)
        flat = self.mean(torch.cat([tensors[k].reshape(-1) for k in keys]), weight)
        out, at = {}, 0
        for k in keys:
            n = tensors[k].numel()
            out[k] = flat[at : at + n].view_as(tensors[k]).to(tensors[k].dtype)
            at += n
        return out

    def mean_grads(self, params: Iterable[torch.Tensor], weight: float) -> None:
        """Replace each parameter's `.grad` by its sample-weighted mean over processes (what DDP does);
        parameters without a gradient are skipped (which ones have none depends on the graph only)."""
        if not self.active:
            return
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        grads = self.mean_dict({str(i): p.grad for i, p in enumerate(ps)}, weight)
        for i, p in enumerate(ps):
            p.grad.copy_(grads[str(i)])

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values (candidate initial values, seeds)."""

    def average_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Average BatchNorm running statistics of `modules` over processes (statistics refreshed on each
        rank's shard become those of the union, up to the shards' variance-of-means term)."""
        if not self.active:
            return
        bufs = [
            b
            for m in modules
            if is_batchnorm(m)
            for b in (m.running_mean, m.running_var)
            if b is not None
        ]
        if not bufs:
            return
        avg = self.mean_dict({str(i): b.detach() for i, b in enumerate(bufs)}, 1.0)
        with torch.no_grad():
            for i, b in enumerate(bufs):
                b.copy_(avg[str(i)])


_IDENTITY = GrowthSync()
_current: GrowthSync = _IDENTITY


def current_sync() -> GrowthSync:
    """The hook growers reduce through: the identity unless a runtime installed one (`sync_growth`)."""
    return _current


@contextlib.contextmanager
def sync_growth(sync: GrowthSync | None) -> Iterator[GrowthSync]:
    """Install `sync` as `current_sync()` for one growth step (None: the identity)."""
    global _current
    previous, _current = _current, (sync if sync is not None else _IDENTITY)
    try:
        yield _current
    finally:
        _current = previous


def plan_digest(history: Any) -> str:
    """Short digest of plan records (growth-history entries: structure, units, amplitudes, no tensors), to
    check that every rank applied the same plans. The records must be identical, not merely close."""

    return hashlib.sha256(json.dumps(history, sort_keys=True, default=repr).encode()).hexdigest()[:16]
