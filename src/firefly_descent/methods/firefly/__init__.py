"""Firefly neural architecture descent."""

from .descent import PRESETS, Firefly, FireflyConfig, default_depth_boundaries, midpoints

__all__ = ["PRESETS", "Firefly", "FireflyConfig", "default_depth_boundaries", "midpoints"]
