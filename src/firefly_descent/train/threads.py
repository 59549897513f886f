"""How many intra-op threads a run uses, and a notice when other work already fills the CPUs.

On a CPU shared with other jobs, torch's intra-op workers spin while waiting for each other, so a run
with as many threads as cores slows down far more than its lost share of the CPU (measured in
`docs/architecture.md`, "Shared CPUs"). ``train.threads`` sets the count; unset, a run uses torch's
current setting capped at the cores this process may use (affinity and cgroup quota), and prints one
notice when the machine is already busy. The count is never changed behind the user's back, because it
changes floating-point summation order and so the training trajectory.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["available_cores", "busy_notice", "choose_threads"]


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def choose_threads(requested: int | None) -> int:
    """Set and return torch's intra-op thread count: `requested`, else torch's current count capped at
    `available_cores()` (so a container never runs more workers than the CPUs it gets)."""
    n = requested if requested is not None else min(torch.get_num_threads(), available_cores())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def busy_notice(threads: int, requested: int | None, key: str = "train.threads") -> str | None:
    """One line when the 1-minute load average says other work already occupies CPUs this run's
    `threads` workers need (None when quiet, single-threaded, or the thread count was set explicitly).
    `key` is the config key whose ``--set KEY=1`` the notice advises (``threads`` for `firefly search`)."""
    if threads <= 1 or requested is not None:
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = available_cores()
    if load < 0.75:  # less than one core's worth of other work
        return None
    return (
        f"note: this machine is busy (load {load:.1f} on {cores} cores); {threads} intra-op threads can slow "
        f"training many times over when CPUs are shared: --set {key}=1 avoids it"
    )
