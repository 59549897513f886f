"""Growth methods: each is a `Grower` that writes a plan and lets the engine apply it."""

from .base import Grower, GrowthReport, available_growers, make_grower, register_grower

__all__ = ["Grower", "GrowthReport", "available_growers", "make_grower", "register_grower"]
