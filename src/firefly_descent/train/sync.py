"""The sync backend of a torchrun job: collectives over the process group, and `RankSync`, the
`collective.GrowthSync` through which growers reduce their statistics across ranks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..collective import GrowthSync

__all__ = ["ProcessGroup", "RankSync"]


class ProcessGroup:
    """Collectives over the default process group; with nccl, CPU tensors travel through `comm_device`."""

    def __init__(self, comm_device: torch.device | None = None) -> None:
        self.comm_device = comm_device

    def broadcast(self, t: torch.Tensor) -> None:
        """In-place broadcast from rank 0 of any tensor (moved through the comm device if needed)."""
        if self.comm_device is not None and t.device != self.comm_device or not t.is_contiguous():
            tmp = t.detach().to(self.comm_device or t.device).contiguous()
            dist.broadcast(tmp, 0)
            t.copy_(tmp)
        else:
            dist.broadcast(t, 0)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (in place when `t` is on the comm device)."""
        if self.comm_device is not None and t.device != self.comm_device:
            tmp = t.to(self.comm_device)
            dist.all_reduce(tmp)
            return tmp.to(t.device)
        dist.all_reduce(t)
        return t

    def reduce_sums(self, *values: float) -> tuple[float, ...]:
        """Per-process counters summed over ranks (in float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return tuple(float(v) for v in self.all_reduce(t).tolist())

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any, world_size: int) -> list[Any]:
        """Every rank's `value`, in rank order."""
        every: list[Any] = [None] * world_size
        dist.all_gather_object(every, value)
        return every


class _Rank(Protocol):
    rank: int
    world_size: int
    group: ProcessGroup


class RankSync(GrowthSync):
    """`GrowthSync` over the ranks of the process group: all-reduces in float64 (then cast back), so the
    combined statistics do not depend on the number of ranks beyond float summation order."""

    def __init__(self, runtime: _Rank) -> None:
        self.group = runtime.group
        self.world_size, self.rank = runtime.world_size, runtime.rank

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        return self.group.all_reduce(t.detach().to(torch.float64)).to(t.dtype)

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        return self.group.reduce_sums(*values)

    def mean(self, t: torch.Tensor, weight: float) -> torch.Tensor:
        if not self.active:
            return t
        w = torch.tensor([float(weight)], dtype=torch.float64, device=t.device)
        buf = self.group.all_reduce(torch.cat([t.detach().reshape(-1).to(torch.float64) * w, w]))
        return (buf[:-1] / buf[-1].clamp(min=1e-300)).view(t.shape).to(t.dtype)

    @torch.no_grad()
    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        ts = list(tensors)
        if not ts or not self.active:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts])
        self.group.broadcast(flat)
        at = 0
        for t in ts:
            t.copy_(flat[at : at + t.numel()].view(t.shape))
            at += t.numel()
