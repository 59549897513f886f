"""Search configuration (`firefly search CONFIG`): typed sections, validated like training configs.

Every problem raises `ConfigError` with one line naming the dotted key. Sections:
  method  name (firefly | darts | random) and kwargs for it
  space   the DARTS search space at search size: C, layers, steps
  data    the same section as training (dataset, subsets, validation split, batch size)
  budget  search epochs (every method's passes over the training split; see docs/cellsearch.md)
  optim   weight optimiser of the search (SGD, cosine lr)
  eval    the one evaluation protocol every genotype gets (train from scratch at eval size); epochs 0 skips
  seeds   a list of seeds, one search per seed
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..methods.safety import SAFEGUARD_KEYS
from ..train.config import ConfigError, DataConfig, apply_overrides, build_section, load_raw

METHODS = ("firefly", "darts", "random")


@dataclass
class MethodConfig:
    name: Literal["firefly", "darts", "random"] = "firefly"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpaceConfig:
    C: int = 8
    layers: int = 5
    steps: int = 4
    stem_multiplier: int = 3


@dataclass
class BudgetConfig:
    epochs: int = 10


@dataclass
class SearchOptimConfig:
    lr: float = 0.025
    min_lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0


@dataclass
class EvalConfig:
    epochs: int = 0
    C: int = 16
    layers: int = 8
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    lr: float = 0.025
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    batch_size: int | None = None


@dataclass
class SearchConfig:
    name: str = "search"
    method: MethodConfig = field(default_factory=MethodConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(val_fraction=0.5, batch_size=64, augment=None))
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: SearchOptimConfig = field(default_factory=SearchOptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    threads: int | None = None


_METHOD_KWARGS = {
    "firefly": {"rounds", "budget", "max_edges", "max_in_degree", "ops", "eps_init", "eps_max", "lr",
                "step_one_batches", "score_batches", "points", "calibrate_batches", "init_op", "cost",
                "distinct_inputs", "kinds", "rank", "widen", "max_cells", "safeguard"},
    "darts": {"order", "arch_lr", "arch_weight_decay"},
    "random": {"trials"},
}


def validate(cfg: SearchConfig) -> None:
    """Cross-field checks; one line naming the key."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    bad = sorted(set(cfg.method.kwargs) - _METHOD_KWARGS[cfg.method.name])
    need(not bad, f"method.kwargs: unknown option(s) {', '.join(bad)} for {cfg.method.name}; "
         f"allowed: {', '.join(sorted(_METHOD_KWARGS[cfg.method.name]))}")
    need(cfg.space.C >= 1, f"space.C: must be >= 1, got {cfg.space.C}")
    need(cfg.space.layers >= 3,
         f"space.layers: must be >= 3 (two reduction cells and a normal one), got {cfg.space.layers}")
    need(1 <= cfg.space.steps <= 8, f"space.steps: must be in 1..8, got {cfg.space.steps}")
    need(cfg.budget.epochs >= 1, f"budget.epochs: must be >= 1, got {cfg.budget.epochs}")
    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction: a search needs a validation split in (0, 1), "
         f"got {cfg.data.val_fraction}")
    need(cfg.data.batch_size >= 1, f"data.batch_size: must be >= 1, got {cfg.data.batch_size}")
    need(bool(cfg.seeds) and len(set(cfg.seeds)) == len(cfg.seeds), "seeds: a non-empty list of distinct integers")
    need(cfg.eval.epochs >= 0, f"eval.epochs: must be >= 0, got {cfg.eval.epochs}")
    need(cfg.eval.layers >= 3 and cfg.eval.C >= 1, "eval: layers >= 3 and C >= 1")
    need(0.0 <= cfg.eval.drop_path_prob < 1.0,
         f"eval.drop_path_prob: must be in [0, 1), got {cfg.eval.drop_path_prob}")
    need(cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"),
         f"device: {cfg.device!r}; use auto, cpu or cuda[:N]")
    kw = cfg.method.kwargs
    if cfg.method.name == "firefly":
        rounds = int(kw.get("rounds", 3))
        need(0 <= rounds < cfg.budget.epochs,
             f"method.kwargs.rounds: {rounds} growth rounds need budget.epochs > rounds")
        kinds = kw.get("kinds", ["edges", "widen", "cells"])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        need(isinstance(kinds, list) and bool(kinds) and all(k in ("edges", "widen", "cells") for k in kinds),
             f"method.kwargs.kinds: a non-empty subset of edges, widen, cells; got {kinds!r}")
        need(kw.get("rank", "efficiency") in ("efficiency", "score"),
             f"method.kwargs.rank: efficiency (score per cost) or score; got {kw.get('rank')!r}")
        widen = kw.get("widen", 0.5)
        need(isinstance(widen, (int, float)) and 0 < widen <= 4,
             f"method.kwargs.widen: new channels per cell as a fraction of C, in (0, 4]; got {widen!r}")
        cells = kw.get("max_cells", 2)
        need(isinstance(cells, int) and cells >= 0, f"method.kwargs.max_cells: an integer >= 0; got {cells!r}")
        guard = kw.get("safeguard", {})
        need(guard is None or isinstance(guard, dict), "method.kwargs.safeguard: a mapping of safeguard options")
        if isinstance(guard, dict):

            bad_g = sorted(set(guard) - set(SAFEGUARD_KEYS))
            need(not bad_g, f"method.kwargs.safeguard: unknown option(s) {', '.join(bad_g)}; "
                 f"allowed: {', '.join(SAFEGUARD_KEYS)}")
    if cfg.method.name == "random":
        trials = int(kw.get("trials", 4))
        need(1 <= trials <= cfg.budget.epochs, f"method.kwargs.trials: must be in 1..budget.epochs, got {trials}")
    if cfg.method.name == "darts":
        need(int(kw.get("order", 1)) in (1, 2), "method.kwargs.order: 1 (first order) or 2 (second order)")


def load_search_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> SearchConfig:
    """Load YAML (or a dict), apply `--set` overrides, build and validate."""
    raw = dict(source) if isinstance(source, Mapping) else load_raw(source)
    raw = apply_overrides(raw, overrides)
    cfg = build_section(SearchConfig, raw, "")
    validate(cfg)
    return cfg


def search_config_to_dict(cfg: SearchConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
