"""Cell-based architecture search in the DARTS space: Firefly cell growth, DARTS and random search."""

from .firefly_cells import CellGrowthReport, CellSearchCandidate, FireflyCells
from .overgrown import (
    CellCandidate,
    WidenCandidate,
    branch_plan,
    build_overgrown,
    build_overgrown_cells,
    build_widened,
    candidate_cells,
    cell_layer_spec,
    integrated_scores,
    widen_plan,
)
from .space import SEARCH_OPS, EdgeCandidate, candidate_cost, candidate_edges, minimal_genotype, random_genotype

__all__ = [
    "SEARCH_OPS",
    "CellCandidate",
    "CellGrowthReport",
    "CellSearchCandidate",
    "EdgeCandidate",
    "FireflyCells",
    "branch_plan",
    "build_overgrown",
    "build_overgrown_cells",
    "build_widened",
    "candidate_cells",
    "candidate_cost",
    "candidate_edges",
    "cell_layer_spec",
    "integrated_scores",
    "minimal_genotype",
    "random_genotype",
    "WidenCandidate",
    "widen_plan",
]
