"""The DARTS cell search space as a model family (Liu, Simonyan, Yang, ICLR 2019), from the paper's text.

A network is a stem (3x3 conv + BatchNorm to `stem_multiplier`·C channels), `layers` cells and a global
average pool + linear classifier. Cell k reads the outputs of cells k-2 and k-1 (both preprocessed to C
channels: a ReLU-1x1 conv-BN, or a factorized reduce when cell k-1 halved the resolution), computes its
intermediate nodes as sums of operations applied to earlier nodes, and outputs the concatenation of the
nodes in `concat`. Cells at 1/3 and 2/3 of the depth are reduction cells: their operations on the two
input nodes have stride 2, and C doubles. The evaluation extras are an auxiliary classifier after the
second reduction cell and drop-path (each non-identity operation's output is zeroed per sample with
probability `drop_path_prob` during training and rescaled).

Nodes are `Node` modules that sum their branches: a new edge is added with `Node.add_branch` (the
engine's `NewBranch` plan entry), so cells grow like any other model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ScaledBranch, register_body
from .genotype import PRIMITIVES, Genotype, load_genotype

__all__ = [
    "OPS",
    "AuxiliaryHead",
    "Cell",
    "DartsNetwork",
    "FactorizedReduce",
    "Node",
    "ResidualCell",
    "base_cell",
    "cell_paths",
    "count_parameters",
    "darts_eval",
    "make_op",
]


class ReLUConvBN(nn.Sequential):
    """ReLU, convolution, BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise (dilated) conv, pointwise conv, BatchNorm."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, affine: bool = True
    ) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """A depthwise-separable conv block applied twice (the first with the stride)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, kernel, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Zero(nn.Module):
    """The `none` operation: zeros at the output resolution."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing half the pixels: two stride-2 1x1 convs, the second on the input
    shifted by one pixel, concatenated. (Zero-padded at the far edge so odd sizes work too; for even sizes
    this is exactly the shift by one.)"""

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def _pool(kind: str, stride: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


OPS: dict[str, Any] = {
    "none": lambda c, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine: _pool("avg", stride),
    "max_pool_3x3": lambda c, stride, affine: _pool("max", stride),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}
assert set(OPS) == set(PRIMITIVES)


def make_op(name: str, channels: int, stride: int = 1, affine: bool = True) -> nn.Module:
    """One of the eight DARTS operations on `channels` channels (stride 2 on a reduction cell's inputs)."""
    if name not in OPS:
        raise ValueError(f"unknown DARTS operation {name!r}; use one of {', '.join(PRIMITIVES)}")
    return OPS[name](int(channels), int(stride), bool(affine))


def _op_body(spec: dict[str, Any]) -> nn.Module:
    return make_op(spec["op"], spec["channels"], spec.get("stride", 1), spec.get("affine", True))


register_body("darts_op", _op_body)


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability `drop_prob`, rescale the rest by 1/(1 - drop_prob)."""
    keep = 1.0 - drop_prob
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x / keep * mask


def _is_identity(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, ScaledBranch) and isinstance(m.body, nn.Identity))


class Node(nn.Module):
    """An intermediate node: the sum of its incoming edges, each an operation on an earlier node."""

    def __init__(self) -> None:
        super().__init__()
        self.edges = nn.ModuleList()
        self.sources: list[int] = []
        self.ops: list[str] = []
        self.drop_prob = 0.0

    def add_branch(self, module: nn.Module, source: int, op: str = "?") -> None:
        """Add edge `module(states[source])` to the sum (the engine's `NewBranch` entry calls this)."""
        self.edges.append(module)
        self.sources.append(int(source))
        self.ops.append(str(op))

    def remove_last_branch(self) -> None:
        """Undo the newest `add_branch` (used by the engine's rollback)."""
        del self.edges[len(self.edges) - 1]
        self.sources.pop()
        self.ops.pop()

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for edge, src in zip(self.edges, self.sources):
            h = edge(states[src])
            if self.training and self.drop_prob > 0 and not _is_identity(edge):
                h = drop_path(h, self.drop_prob)
            total = h if total is None else total + h
        if total is None:
            raise RuntimeError("a DARTS node needs at least one incoming edge")
        return total


class Cell(nn.Module):
    """A DARTS cell: two preprocessed inputs, intermediate nodes, concatenated output."""

    def __init__(
        self,
        edges: list[tuple[str, int, int]],
        concat: list[int],
        steps: int,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.reduction = bool(reduction)
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, channels, affine)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine)
        self.nodes = nn.ModuleList(Node() for _ in range(steps))
        for op, j, i in edges:
            self.nodes[i - 2].add_branch(make_op(op, channels, self.stride(j), affine), j, op)
        self.concat = list(concat)

    @property
    def channels(self) -> int:
        """The cell's width C, read from its layers so that widening by the engine (and replay) keeps it."""
        return int(self.preprocess1[-1].num_features)

    def stride(self, source: int) -> int:
        """Stride of an edge from node `source` (2 on a reduction cell's inputs)."""
        return 2 if self.reduction and source < 2 else 1

    def edges(self) -> list[tuple[str, int, int]]:
        """The cell's current edges as (operation, input node, target node)."""
        return [(op, j, i + 2) for i, node in enumerate(self.nodes) for op, j in zip(node.ops, node.sources)]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in self.nodes:
            states.append(node(states))
        return torch.cat([states[i] for i in self.concat], dim=1)


class ResidualCell(nn.Module):
    """A new cell in residual form, the body of a `NewLayer` after a cell: z -> cell(z, z), so that the
    engine's `Residual` computes z + scale·cell(z, z), exactly the identity at scale 0. Both of the cell's
    inputs are the previous cell's output z (c_out = len(concat)·C channels), and its output has as many."""

    def __init__(self, edges: list[tuple[str, int, int]], concat: list[int], steps: int, c_out: int,
                 channels: int, affine: bool = True) -> None:
        super().__init__()
        if len(concat) * channels != c_out:
            raise ValueError(f"a residual cell of width {channels} with {len(concat)} outputs gives "
                             f"{len(concat) * channels} channels, not the {c_out} it adds to")
        self.cell = Cell(edges, concat, steps, c_out, c_out, channels, False, False, affine)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.cell(z, z)


def _residual_cell_body(spec: dict[str, Any]) -> nn.Module:
    body = ResidualCell([tuple(e) for e in spec["edges"]], list(spec["concat"]), int(spec["steps"]),
                        int(spec["c_out"]), int(spec["channels"]), spec.get("affine", True))
    body.cell.input_size = int(spec.get("input_size", 0))
    return body


register_body("darts_cell", _residual_cell_body)


def base_cell(m: nn.Module) -> Cell:
    """The DARTS cell at a network position, through any layers the engine inserted after it."""
    while not isinstance(m, Cell):
        if not isinstance(m, nn.Sequential):
            raise TypeError(f"not a DARTS cell position: {type(m).__name__}")
        m = m[0]
    return m


def cell_paths(model: nn.Module, prefix: str = "cells") -> list[tuple[str, Cell, int]]:
    """Every DARTS cell of a network with its module path and top-level position, inserted residual
    cells included (after the cell they follow)."""
    out: list[tuple[str, Cell, int]] = []

    def walk(m: nn.Module, path: str, k: int) -> None:
        if isinstance(m, Cell):
            out.append((path, m, k))
            return
        walk(m[0], f"{path}.0", k)
        for i in range(1, len(m)):
            body = getattr(m[i], "body", None)
            if isinstance(body, ResidualCell):
                out.append((f"{path}.{i}.body.cell", body.cell, k))

    for k, m in enumerate(model.get_submodule(prefix)):
        walk(m, f"{prefix}.{k}", k)
    return out


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier after the second reduction (DARTS/NASNet: pool, 1x1 conv 128, 2x2 conv 768)."""

    def __init__(self, channels: int, num_classes: int, spatial: int) -> None:
        super().__init__()
        # DARTS pools an 8x8 map with a 5x5 window and stride 3 to 2x2; other sizes pool adaptively to 2x2
        pool = (
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
            if spatial == 8
            else nn.AdaptiveAvgPool2d(2)
        )
        self.features = nn.Sequential(
            nn.ReLU(),
            pool,
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DartsNetwork(nn.Module):
    """A network of DARTS cells built from a genotype at any (C, layers).

    In training mode with `auxiliary=True`, the auxiliary logits of the last forward are kept in
    `self.aux_logits` (the output stays the main logits, so any loss and loop work unchanged);
    `auxiliary_loss(y, loss_fn)` returns `auxiliary_weight · loss_fn(aux_logits, y)` to add.
    """

    def __init__(
        self,
        genotype: Genotype | str | dict[str, Any] = "darts_v2",
        C: int = 36,
        layers: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        auxiliary: bool = False,
        auxiliary_weight: float = 0.4,
        drop_path_prob: float = 0.0,
        stem_multiplier: int = 3,
        affine: bool = True,
        reductions: list[int] | None = None,
    ) -> None:
        super().__init__()
        geno = load_genotype(genotype)
        self.genotype_dict = geno.to_dict()
        self.C, self.layers_count = int(C), int(layers)
        self.auxiliary_weight = float(auxiliary_weight)
        reductions = list(reductions) if reductions is not None else [layers // 3, 2 * layers // 3]
        self.reduction_layers = sorted({int(r) for r in reductions if 0 <= int(r) < layers})
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr, affine=affine)
        )
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev, spatial = False, int(input_size)
        self.aux_index = -1
        c_aux, aux_spatial = 0, 0
        for i in range(layers):
            reduction = i in self.reduction_layers
            spatial_in = spatial
            if reduction:
                c_curr *= 2
                spatial = (spatial + 1) // 2
            kind = "reduce" if reduction else "normal"
            concat = geno.reduce_concat if reduction else geno.normal_concat
            steps = geno.steps(kind)
            cell = Cell(geno.edges(kind), concat, steps, c_pp, c_p, c_curr, reduction, reduction_prev, affine)
            cell.input_size = spatial_in  # resolution of the cell's input nodes (for FLOP costs)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, len(concat) * c_curr
            if self.reduction_layers and i == self.reduction_layers[-1]:
                self.aux_index, c_aux, aux_spatial = i, c_p, spatial
        self.auxiliary_head = (
            AuxiliaryHead(c_aux, num_classes, aux_spatial) if auxiliary and self.aux_index >= 0 else None
        )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)
        self.aux_logits: torch.Tensor | None = None
        self.drop_path_prob = float(drop_path_prob)

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p: float) -> None:
        """Set drop-path for every node (DARTS raises it linearly over training)."""
        self._drop_path_prob = float(p)
        for m in self.modules():
            if isinstance(m, Node):
                m.drop_prob = float(p)

    def genotype(self) -> Genotype:
        """The genotype of the network's current cells (all cells of a type share it; the first is read)."""
        cells = [base_cell(c) for c in self.cells]
        normal = next((c for c in cells if not c.reduction), None)
        reduce = next((c for c in cells if c.reduction), None)
        base = Genotype.from_dict(self.genotype_dict)
        return Genotype.from_edges(
            normal.edges() if normal is not None else base.edges("normal"),
            reduce.edges() if reduce is not None else base.edges("reduce"),
            normal.concat if normal is not None else base.normal_concat,
            reduce.concat if reduce is not None else base.reduce_concat,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                self.aux_logits = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(torch.flatten(out, 1))

    def auxiliary_loss(self, y: torch.Tensor, loss_fn: Any) -> torch.Tensor | None:
        """The weighted auxiliary loss of the last training forward (None without an auxiliary head)."""
        if self.auxiliary_head is None or self.aux_logits is None or not self.training:
            return None
        aux, self.aux_logits = self.aux_logits, None
        return self.auxiliary_weight * loss_fn(aux, y)


def count_parameters(model: nn.Module, auxiliary: bool = False) -> int:
    """Parameters as DARTS reports them: without the auxiliary head unless `auxiliary=True`."""
    return sum(p.numel() for n, p in model.named_parameters() if auxiliary or "auxiliary" not in n)


def darts_eval(
    genotype: str | dict[str, Any] = "darts_v2",
    C: int = 36,
    layers: int = 20,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    auxiliary: bool = True,
    auxiliary_weight: float = 0.4,
    drop_path_prob: float = 0.0,
) -> nn.Module:
    """The `darts-eval` model: a genotype (published name, JSON/literal file) at (C, layers)."""
    return DartsNetwork(
        genotype, C, layers, num_classes, in_channels, input_size, auxiliary, auxiliary_weight, drop_path_prob
    )
