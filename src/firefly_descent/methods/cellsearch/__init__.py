"""Cell-based architecture search in the DARTS space: Firefly cell growth, DARTS and random search."""

from .firefly_cells import CellGrowthReport, FireflyCells, branch_plan, build_overgrown, integrated_scores
from .space import SEARCH_OPS, EdgeCandidate, candidate_cost, candidate_edges, minimal_genotype, random_genotype

__all__ = [
    "SEARCH_OPS",
    "CellGrowthReport",
    "EdgeCandidate",
    "FireflyCells",
    "branch_plan",
    "build_overgrown",
    "candidate_cost",
    "candidate_edges",
    "integrated_scores",
    "minimal_genotype",
    "random_genotype",
]
