"""`firefly search`: cell-based architecture search (Firefly, DARTS, random) from a config, resumable."""

from .config import SearchConfig, load_search_config
from .draw import draw_cell
from .runner import run_search, run_seed

__all__ = ["SearchConfig", "draw_cell", "load_search_config", "run_search", "run_seed"]
