"""Learning-rate schedule with optional restart at each growth, and the optimizer factory.

The schedule is a pure function of (epoch, batch) within a *phase*: the whole run, or, with
``schedule.restart_after_growth`` (the paper's code), the span from one growth to the next.
Its only state is the current phase's bounds, so checkpoints store two integers.

``step`` changes the rate only at epoch boundaries: milestone ``m`` of a phase of ``L`` epochs acts from
the first epoch ``e`` with ``e / L >= m``, so it acts only in phases of at least ``1 / (1 - m)`` epochs (0.75
needs 4). Stepping within epochs would change every existing run's numbers, so a run whose phases are all
too short for one of its milestones starts with a one-line notice naming it (`milestone_notice`) instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .config import Config, OptimConfig, ScheduleConfig, growth_epochs

__all__ = ["LRSchedule", "inert_milestones", "make_optimizer", "milestone_notice"]


class LRSchedule:
    """Per-step learning rate: ``step`` (milestone fractions × gamma), ``cosine`` or ``constant``.

    ``step`` changes only at epoch boundaries; ``cosine`` anneals per batch to ``min_lr``.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, phase_start: int, phase_end: int) -> None:
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.phase_start = int(phase_start)
        self.phase_end = int(phase_end)

    def new_phase(self, start: int, end: int) -> None:
        """Start a phase covering training epochs ``[start, end)`` (0-based)."""
        self.phase_start, self.phase_end = int(start), int(max(end, start + 1))

    def lr_at(self, epoch: int, batch: int = 0, batches_per_epoch: int = 1) -> float:
        """Learning rate for 0-based `epoch` and `batch` of `batches_per_epoch`."""
        c = self.cfg
        length = max(1, self.phase_end - self.phase_start)
        done = epoch - self.phase_start
        if c.name == "constant":
            return self.base_lr
        if c.name == "step":
            p = done / length
            k = sum(1 for m in c.milestones if p >= m - 1e-12)
            return self.base_lr * (c.gamma**k)
        p = (done + batch / max(1, batches_per_epoch)) / length
        p = min(max(p, 0.0), 1.0)
        return c.min_lr + (self.base_lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, batch: int = 0, batches_per_epoch: int = 1) -> float:
        """Set the learning rate of every param group and return it."""
        lr = self.lr_at(epoch, batch, batches_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """The phase bounds (everything else comes from the config)."""
        return {"name": self.cfg.name, "phase_start": self.phase_start, "phase_end": self.phase_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the phase bounds."""
        self.phase_start, self.phase_end = int(state["phase_start"]), int(state["phase_end"])

    @classmethod
    def from_config(cls, cfg: Config, phase_end: int) -> LRSchedule:
        """The first phase: epochs ``[0, phase_end)``."""
        return cls(cfg.schedule, cfg.optim.lr, 0, phase_end)


def phase_lengths(cfg: Config) -> list[int]:
    """Lengths in epochs of the run's LR phases as planned (growth may stop early at a size limit)."""
    epochs = cfg.train.epochs
    if not cfg.schedule.restart_after_growth:
        return [epochs]
    bounds = [0, *(e for e in growth_epochs(cfg) if 0 < e < epochs), epochs]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


def inert_milestones(cfg: Config) -> list[float]:
    """The ``step`` milestones that take effect in no LR phase of the run (the rate steps only at epoch
    boundaries, so milestone m needs a phase of at least 1 / (1 - m) epochs)."""
    if cfg.schedule.name != "step":
        return []
    longest = max(phase_lengths(cfg), default=1)
    return [m for m in cfg.schedule.milestones if (longest - 1) / longest < m - 1e-12]


def milestone_notice(cfg: Config) -> str | None:
    """One line naming milestones that never act (see `inert_milestones`), or None."""
    inert = inert_milestones(cfg)
    if not inert:
        return None
    longest = max(phase_lengths(cfg), default=1)
    return (
        f"notice: schedule.milestones {', '.join(f'{m:g}' for m in inert)} never take effect: the step schedule "
        f"changes the LR only at epoch boundaries and the longest LR phase is {longest} epoch(s); "
        "drop them, use longer phases, or schedule.name=cosine"
    )


def make_optimizer(
    params: Iterable[nn.Parameter] | Sequence[dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW from the config."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
