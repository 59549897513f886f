"""Training with a growth schedule: typed configs, the loop, checkpoints and exact resume.

A file per job: `config` (typed, validated configs), `setup` (data, model and grower from a config),
`rundir` (the run directory and its logs), `state` + `checkpoint` (a run's state and its files),
`growth_step`, `epochs` (the loop), `metrics`, `device`, `schedule`, `loop` (`train` / `resume`);
under torchrun `runtime`, `distributed`, `sync`, `hashing` and `launcher`.

>>> from firefly_descent.train import train
>>> summary = train("digits-mlp-firefly", "runs/demo")          # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names
from .config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    GrowthConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    growth_epochs,
    load_config,
    named_configs,
)

if TYPE_CHECKING:
    from ..engine import refresh_batchnorm
    from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
    from .device import DeviceLoader, resolve_device, seed_everything
    from .loop import resume, train
    from .metrics import evaluate, summarize
    from .schedule import LRSchedule, make_optimizer
    from .setup import RunSetup, build_model_for, prepare
    from .state import Run

# torch-backed names load on first use, so reading and validating a config stays instant
_LAZY: dict[str, str] = {
    **dict.fromkeys(("CheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint"), ".checkpoint"),
    **dict.fromkeys(("DeviceLoader", "resolve_device", "seed_everything"), ".device"),
    **dict.fromkeys(("resume", "train"), ".loop"),
    **dict.fromkeys(("evaluate", "summarize"), ".metrics"),
    **dict.fromkeys(("LRSchedule", "make_optimizer"), ".schedule"),
    **dict.fromkeys(("RunSetup", "build_model_for", "prepare"), ".setup"),
    "Run": ".state",
    "refresh_batchnorm": "..engine",  # the engine's: one BatchNorm refresh for growers and the loop
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeviceLoader",
    "GrowthConfig",
    "LRSchedule",
    "ModelConfig",
    "OptimConfig",
    "Run",
    "RunSetup",
    "ScheduleConfig",
    "TrainConfig",
    "build_model_for",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "growth_epochs",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "make_optimizer",
    "named_configs",
    "prepare",
    "refresh_batchnorm",
    "resolve_device",
    "resume",
    "seed_everything",
    "summarize",
    "train",
]
