"""Training with a growth schedule: typed configs, the loop, checkpoints and exact resume.

>>> from firefly_descent.train import train
>>> summary = train("digits-mlp-firefly", "runs/demo")          # doctest: +SKIP
"""

from __future__ import annotations

from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
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
