"""Growth methods: each is a `Grower` that writes a plan and lets the engine apply it."""

from . import firefly  # noqa: F401  (registers "firefly")
from .base import Grower, GrowthReport, available_growers, make_grower, register_grower
from .firefly import Firefly

try:  # the baselines register themselves on import
    from . import baselines  # noqa: F401
except ImportError:  # pragma: no cover - while the package is being assembled
    pass

__all__ = ["Firefly", "Grower", "GrowthReport", "available_growers", "make_grower", "register_grower"]
