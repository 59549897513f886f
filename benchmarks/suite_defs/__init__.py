"""The benchmark suites as data: one module per suite (a.py ... f.py), each its base config per preset, its
methods (a grower and the config keys the run changes) and its seeds per preset.

benchmarks/suites.py is the one driver that runs them; benchmarks/results_io.py reads and writes the result
files. Adding a suite: a module here with a `Suite`, and one entry in `SUITES` (its order is the docs' order).
"""

from __future__ import annotations

from . import a, b, b_long, c, d, e, f, g
from ._spec import BUDGET, CIFAR10_ENV, CIFAR100_ENV, FASHION_ROOT, PRESETS, Method, SkipRun, Suite

SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        a.SUITE,
        b.SUITE,
        b_long.SUITE,
        c.SUITE,
        d.SUITE,
        f.SUITE,
        g.SUITE,
        e.SUITE,
        e.SUITE_FMNIST,
        e.SUITE_CIFAR100,
    )
}

__all__ = [
    "BUDGET",
    "CIFAR100_ENV",
    "CIFAR10_ENV",
    "FASHION_ROOT",
    "PRESETS",
    "SUITES",
    "Method",
    "SkipRun",
    "Suite",
]
