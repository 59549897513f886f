"""Growth methods: each is a `Grower` that writes a plan and lets the engine apply it."""

from . import (
    baselines,  # noqa: F401,E402  (registers the baselines)
    firefly,  # noqa: F401  (registers "firefly")
)
from .base import Grower, GrowthReport, available_growers, make_grower, register_grower
from .firefly import Firefly

__all__ = ["Firefly", "Grower", "GrowthReport", "available_growers", "make_grower", "register_grower"]
