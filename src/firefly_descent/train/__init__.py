"""Training with a growth schedule: typed configs, the loop, checkpoints and exact resume.

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
    from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
    from .loop import (
        DeviceLoader,
        build_model_for,
        evaluate,
        prepare,
        refresh_batchnorm,
        resolve_device,
        resume,
        seed_everything,
        summarize,
        train,
    )
    from .schedule import LRSchedule, make_optimizer

# torch-backed names load on first use, so reading and validating a config stays instant
_LAZY: dict[str, str] = {
    **dict.fromkeys(("CheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint"), ".checkpoint"),
    **dict.fromkeys(
        (
            "DeviceLoader",
            "build_model_for",
            "evaluate",
            "prepare",
            "refresh_batchnorm",
            "resolve_device",
            "resume",
            "seed_everything",
            "summarize",
            "train",
        ),
        ".loop",
    ),
    **dict.fromkeys(("LRSchedule", "make_optimizer"), ".schedule"),
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
