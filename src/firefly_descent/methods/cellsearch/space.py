"""The DARTS search space seen by a search method: candidate edges, minimal and random genotypes, costs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ...models.darts import Cell, DartsNetwork, cell_paths, make_op
from ...models.genotype import PRIMITIVES, Genotype

KINDS = ("normal", "reduce")
SEARCH_OPS = tuple(op for op in PRIMITIVES if op != "none")


@dataclass(frozen=True)
class EdgeCandidate:
    """A new edge `op(x_source)` into intermediate node `node` (>= 2) of every cell of type `kind`."""

    kind: str
    op: str
    source: int
    node: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.op}({self.source})->{self.node}"


def minimal_genotype(steps: int = 4, op: str = "sep_conv_3x3") -> Genotype:
    """One edge per node: node i reads node i-1 with `op` (a chain from the previous cell's output)."""
    chain = [(op, i - 1, i) for i in range(2, 2 + steps)]
    return Genotype.from_edges(chain, list(chain))


def random_genotype(rng: random.Random, steps: int = 4, ops: tuple[str, ...] = SEARCH_OPS) -> Genotype:
    """A uniformly sampled DARTS genotype: each node reads two distinct earlier nodes with random operations."""
    cells = []
    for _ in KINDS:
        edges = []
        for i in range(2, 2 + steps):
            for j in sorted(rng.sample(range(i), 2)):
                edges.append((rng.choice(ops), j, i))
        cells.append(edges)
    return Genotype.from_edges(cells[0], cells[1])


def cells_of(model: DartsNetwork, kind: str) -> list[tuple[str, Cell]]:
    """(module path, cell) of every cell of one type, new residual cells (normal) included."""
    return [(path, c) for path, c, _ in cell_paths(model) if c.reduction == (kind == "reduce")]


def candidate_edges(
    model: DartsNetwork, ops: tuple[str, ...] = SEARCH_OPS, max_in_degree: int | None = 2,
    distinct_inputs: bool = False,
) -> list[EdgeCandidate]:
    """Every new edge (op, source, node) not yet in the cells, per cell type, on nodes below `max_in_degree`.

    A second operation on a pair (source, node) that already has an edge is a candidate unless
    `distinct_inputs` (the DARTS discretisation's rule: a node's edges come from distinct inputs)."""
    out = []
    for kind in KINDS:
        idx = cells_of(model, kind)
        if not idx:
            continue
        cell = idx[0][1]
        for n, node in enumerate(cell.nodes):
            i = n + 2
            if max_in_degree is not None and len(node.sources) >= max_in_degree:
                continue
            have = set(zip(node.ops, node.sources))
            for j in range(i):
                if distinct_inputs and j in node.sources:
                    continue
                for op in ops:
                    if (op, j) not in have:
                        out.append(EdgeCandidate(kind, op, j, i))
    return out


def op_params(op: str, channels: int, stride: int) -> int:
    """Parameters of one operation at `channels` channels."""
    module: nn.Module = make_op(op, channels, stride)
    return sum(p.numel() for p in module.parameters())


def op_flops(op: str, channels: int, stride: int, size: int) -> int:
    """FLOPs of one operation on one `channels` x `size` x `size` input (torch.utils.flop_counter)."""
    module = make_op(op, channels, stride).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(1, channels, size, size))
    return int(counter.get_total_flops())


def candidate_cost(model: DartsNetwork, cand: EdgeCandidate, kind: str = "params") -> int:
    """What the candidate adds in every cell of its type: parameters (plus one scale per cell) or FLOPs."""
    if kind not in ("params", "flops"):
        raise ValueError(f"cost kind must be 'params' or 'flops', got {kind!r}")
    total = 0
    for _, cell in cells_of(model, cand.kind):
        stride = cell.stride(cand.source)
        if kind == "params":
            total += op_params(cand.op, cell.channels, stride) + 1
        else:
            size = cell.input_size if cand.source < 2 or not cell.reduction else (cell.input_size + 1) // 2
            total += op_flops(cand.op, cell.channels, stride, size)
    return total
