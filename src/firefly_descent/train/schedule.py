"""Learning-rate schedule with optional restart at each growth, and the optimizer factory.

The schedule is a pure function of (epoch, batch) within a *phase*: the whole run, or, with
``schedule.restart_after_growth`` (the paper's code), the span from one growth to the next.
Its state is the current phase's bounds (and a warm-up's start), so checkpoints store a few numbers.

``step`` changes the rate only at epoch boundaries: milestone ``m`` of a phase of ``L`` epochs acts from
the first epoch ``e`` with ``e / L >= m``, so it acts only in phases of at least ``1 / (1 - m)`` epochs (0.75
needs 4). Stepping within epochs would change every existing run's numbers, so a run whose phases are all
too short for one of its milestones starts with a one-line notice naming it (`milestone_notice`) instead;
``schedule.step_per_batch`` opts in to stepping at the batch where the phase reaches the milestone (the same
rate at every epoch boundary a milestone falls on). ``schedule.warmup_after_growth`` ramps the rate after each
growth from the rate before it (`LRSchedule.warm_up`), so the schedule's state is the phase bounds and that ramp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .config import Config, OptimConfig, ScheduleConfig, growth_epochs

__all__ = ["LRSchedule", "inert_milestones", "make_optimizer", "milestone_notice", "short_phase_notice"]


class LRSchedule:
    """Per-step learning rate: ``step`` (milestone fractions × gamma), ``cosine`` or ``constant``.

    ``step`` changes only at epoch boundaries; ``cosine`` anneals per batch to ``min_lr``.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, phase_start: int, phase_end: int) -> None:
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.phase_start = int(phase_start)
        self.phase_end = int(phase_end)
        self.warm_from: float | None = None  # rate before the last growth, ramped from (`warm_up`)
        self.warm_start = 0

    def warm_up(self, start: int, from_lr: float) -> None:
        """Ramp linearly from `from_lr` to the schedule's rate over the ``warmup_after_growth`` epochs from epoch
        `start`: after a growth, so a freshly grown model does not take the restarted rate at once."""
        self.warm_from, self.warm_start = float(from_lr), int(start)

    def new_phase(self, start: int, end: int) -> None:
        """Start a phase covering training epochs ``[start, end)`` (0-based)."""
        self.phase_start, self.phase_end = int(start), int(max(end, start + 1))

    def lr_at(self, epoch: int, batch: int = 0, batches_per_epoch: int = 1) -> float:
        """Learning rate for 0-based `epoch` and `batch` of `batches_per_epoch`."""
        lr = self._scheduled(epoch, batch, batches_per_epoch)
        span = float(self.cfg.warmup_after_growth or 0.0)
        if self.warm_from is not None and span > 0:
            t = epoch - self.warm_start + batch / max(1, batches_per_epoch)
            if 0 <= t < span:
                lr = self.warm_from + (t / span) * (lr - self.warm_from)
        return lr

    def _scheduled(self, epoch: int, batch: int, batches_per_epoch: int) -> float:
        c = self.cfg
        length = max(1, self.phase_end - self.phase_start)
        done = epoch - self.phase_start
        if c.name == "constant":
            return self.base_lr
        if c.name == "step":
            p = (done + (batch / max(1, batches_per_epoch) if c.step_per_batch else 0)) / length
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
        """The phase bounds and the warm-up's start (everything else comes from the config)."""
        return {
            "name": self.cfg.name,
            "phase_start": self.phase_start,
            "phase_end": self.phase_end,
            "warm_from": self.warm_from,
            "warm_start": self.warm_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the phase bounds (and the warm-up, absent from checkpoints written before it existed)."""
        self.phase_start, self.phase_end = int(state["phase_start"]), int(state["phase_end"])
        warm = state.get("warm_from")
        self.warm_from = None if warm is None else float(warm)
        self.warm_start = int(state.get("warm_start", 0))

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
    if cfg.schedule.name != "step" or cfg.schedule.step_per_batch:
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
        "drop them, use longer phases, schedule.step_per_batch=true or schedule.name=cosine"
    )


def short_phase_notice(cfg: Config) -> str | None:
    """One line when a phase after a growth is too short for every ``step`` milestone (its rate never decays), so
    the epochs after that growth run, and are evaluated, at the restarted rate (issue 26), or None."""
    s = cfg.schedule
    if s.name != "step" or s.step_per_batch or not s.restart_after_growth or not s.milestones or s.gamma == 1.0:
        return None
    first = min(s.milestones)
    short = [n for n in phase_lengths(cfg)[1:] if (n - 1) / n < first - 1e-12]
    if not short or inert_milestones(cfg):  # all phases short: `milestone_notice` already says so
        return None
    return (
        f"notice: {len(short)} LR phase(s) after a growth last {min(short)} epoch(s), too short for milestone "
        f"{first:g}: the rate restarted at growth never decays in them; schedule.step_per_batch=true steps "
        "within epochs"
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
