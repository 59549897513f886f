"""Baselines the paper compares Firefly against, in the same harness: each writes a plan for the engine.

Importing this package registers: static, net2net, random, nash, splitting-exact, splitting-fast, gradmax, tiny.
"""

from .gradmax import GradMax
from .nash import NASH
from .net2net import Net2Net
from .random_growth import RandomGrowth
from .splitting import SplittingExact, SplittingFast
from .static import Static
from .tiny import TINY

__all__ = ["NASH", "GradMax", "Net2Net", "RandomGrowth", "SplittingExact", "SplittingFast", "Static", "TINY"]
