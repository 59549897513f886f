"""What a suite definition is made of: `Method`, `Suite`, the presets and the constants several suites share."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRESETS = ("quick", "full")
BUDGET = 0.35  # the width suites' budget: 35% more neurons per round, for every method
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR10_ENV = "FIREFLY_CIFAR10"  # the CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg)
CIFAR100_ENV = "FIREFLY_CIFAR100"  # torchvision's layout: <root>/cifar-100-python/{train,test,meta}


class SkipRun(Exception):
    """A run that cannot start yet (e.g. it needs another run's result); the message says why."""


@dataclass(frozen=True)
class Method:
    """One row of a suite: a grower (by name) and how the run differs from the suite's base config.

    kind: "grow" (the grower runs at the suite's growth epochs), "control" (static grower, same schedule),
    "replay" (the final architecture of `replay_of`'s run with the same seed, re-initialised, never grown),
    "matched" (grown at the same epochs with exactly the per-group unit counts `replay_of`'s run of the same
    seed chose: the placement control for a method's decisions).
    """

    grower: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "grow"
    model: dict[str, Any] | None = None  # model kwargs replacing the suite's (controls)
    replay_of: str | None = None
    growth: dict[str, Any] = field(default_factory=dict)  # growth-config keys replacing the suite's (ablations)
    # budget-matched peer: each growth round may add as many parameters as the run of method `budget_of` with the
    # same seed added in that round (growth.budgets); the method chooses where
    budget_of: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Suite:
    """A suite: its base config per preset, its methods, default seeds and a short description.

    `base(preset)` returns a fresh training-config dict (the driver edits it); None for a suite that does
    not train (suite C measures growth cost with benchmarks/growth_cost.py).
    """

    name: str
    title: str
    description: str
    methods: dict[str, Method]
    seeds: dict[str, list[int]]
    base: Callable[[str], dict[str, Any]] | None = None
    sizes: dict[str, str] = field(default_factory=dict)
    compute_view: bool = False  # docs: plot accuracy against total training FLOPs (make_docs.plot_acc_vs_compute)


def dataset_root(env: str, missing: str) -> str:
    """The dataset folder the driver put in the environment variable `env` (from --cifar10 / --cifar100);
    raises `SkipRun(missing)` when it is not set, so the suite is skipped with a line saying what to pass."""
    root = os.environ.get(env)
    if not root:
        raise SkipRun(missing)
    return root
