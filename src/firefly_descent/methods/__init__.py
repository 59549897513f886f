"""Growth methods: each is a `Grower` that writes a plan and lets the engine apply it."""

from . import firefly  # noqa: F401  (registers "firefly")
from .base import Grower, GrowthReport, available_growers, make_grower, register_grower
from .firefly import Firefly

from . import baselines  # noqa: F401,E402  (registers the baselines)

__all__ = ["Firefly", "Grower", "GrowthReport", "available_growers", "make_grower", "register_grower"]
