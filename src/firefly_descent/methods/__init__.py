"""Growth methods: each is a `Grower` whose `decide` writes a plan; the template (methods/base.py) has the
engine apply it under the safeguard."""

from . import (
    baselines,  # noqa: F401,E402  (registers the baselines)
    firefly,  # noqa: F401  (registers "firefly")
)
from .base import Context, Decision, Grower, GrowthReport, available_growers, make_grower, register_grower
from .firefly import Firefly

__all__ = [
    "Context",
    "Decision",
    "Firefly",
    "Grower",
    "GrowthReport",
    "available_growers",
    "make_grower",
    "register_grower",
]
