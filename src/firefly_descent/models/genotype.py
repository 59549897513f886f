"""Genotypes of the DARTS cell search space (Liu, Simonyan, Yang, ICLR 2019).

A genotype names, per cell type (normal, reduce), the incoming edges of each intermediate node as
`(operation, input)` pairs and which nodes the cell output concatenates. Nodes 0 and 1 are the cell's
inputs (the outputs of the two previous cells), intermediate nodes are 2, 3, ...; in the DARTS code the
edges of node k are entries 2(k-2) and 2(k-2)+1 of the list (two per node). Grown cells may have any
number of edges per node: the node of every edge is then listed explicitly in `normal_nodes` /
`reduce_nodes` (and the JSON keeps the DARTS layout whenever the cell has exactly two edges per node).

Reads and writes JSON (`to_json`/`from_json`) and the DARTS code's Python literal
(`Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=range(2, 6), ...)`, `parse`/`to_darts`).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PRIMITIVES", "GENOTYPES", "Genotype", "GenotypeError", "load_genotype"]

# The eight operations of the DARTS space, in the DARTS paper's order.
PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class GenotypeError(ValueError):
    """A malformed genotype; the message is one line naming the problem."""


Edge = tuple[str, int]


@dataclass
class Genotype:
    """The architecture of a normal and a reduction cell (the DARTS code's fields, plus optional nodes)."""

    normal: list[Edge]
    normal_concat: list[int]
    reduce: list[Edge]
    reduce_concat: list[int]
    normal_nodes: list[int] | None = None  # node of each edge; None = two edges per node (DARTS layout)
    reduce_nodes: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (method, seed, ...)

    def __post_init__(self) -> None:
        self.normal = [(str(op), int(j)) for op, j in self.normal]
        self.reduce = [(str(op), int(j)) for op, j in self.reduce]
        self.normal_concat = [int(i) for i in self.normal_concat]
        self.reduce_concat = [int(i) for i in self.reduce_concat]
        for kind in ("normal", "reduce"):
            self.edges(kind)  # validates

    # ---- structure ------------------------------------------------------------------------------
    def edges(self, kind: str) -> list[tuple[str, int, int]]:
        """The cell's edges as (operation, input node, target node), target nodes numbered from 2."""
        if kind not in ("normal", "reduce"):
            raise GenotypeError(f"cell kind must be 'normal' or 'reduce', got {kind!r}")
        pairs = getattr(self, kind)
        nodes = getattr(self, f"{kind}_nodes")
        if nodes is None:
            if len(pairs) % 2:
                raise GenotypeError(
                    f"{kind}: {len(pairs)} edges without {kind}_nodes; the DARTS layout has two per node"
                )
            nodes = [2 + k // 2 for k in range(len(pairs))]
        if len(nodes) != len(pairs):
            raise GenotypeError(f"{kind}_nodes has {len(nodes)} entries for {len(pairs)} edges")
        out = []
        for (op, j), i in zip(pairs, nodes):
            if op not in PRIMITIVES:
                raise GenotypeError(f"{kind}: unknown operation {op!r}; use one of {', '.join(PRIMITIVES)}")
            if i < 2 or not 0 <= j < i:
                raise GenotypeError(f"{kind}: edge {op}({j}) -> node {i} must come from an earlier node (0 <= j < i)")
            out.append((op, int(j), int(i)))
        return out

    def steps(self, kind: str) -> int:
        """Number of intermediate nodes of a cell type (the largest node that has an edge or is output)."""
        nodes = [i for _, _, i in self.edges(kind)] + list(getattr(self, f"{kind}_concat"))
        return max(nodes) - 1 if nodes else 0

    @classmethod
    def from_edges(
        cls,
        normal: list[tuple[str, int, int]],
        reduce: list[tuple[str, int, int]],
        normal_concat: list[int] | None = None,
        reduce_concat: list[int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Genotype:
        """Build from (op, input, node) triples; uses the DARTS layout when every node has two edges."""

        def layout(edges: list[tuple[str, int, int]]) -> tuple[list[Edge], list[int] | None, list[int]]:
            edges = sorted(edges, key=lambda e: e[2])  # stable: keeps the order within a node
            nodes = [i for _, _, i in edges]
            steps = max(nodes) - 1 if nodes else 0
            darts = nodes == [2 + k // 2 for k in range(2 * steps)]
            return [(op, j) for op, j, _ in edges], (None if darts else nodes), list(range(2, 2 + steps))

        n, nn_, nc = layout(normal)
        r, rn, rc = layout(reduce)
        return cls(
            n, normal_concat if normal_concat is not None else nc, r,
            reduce_concat if reduce_concat is not None else rc, nn_, rn, dict(meta or {}),
        )

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "normal": [[op, j] for op, j in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, j] for op, j in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }
        if self.normal_nodes is not None:
            d["normal_nodes"] = list(self.normal_nodes)
        if self.reduce_nodes is not None:
            d["reduce_nodes"] = list(self.reduce_nodes)
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Genotype:
        if not isinstance(d, dict):
            raise GenotypeError(
                f"a genotype is a mapping with normal/normal_concat/reduce/reduce_concat, got {type(d).__name__}"
            )
        missing = [k for k in ("normal", "normal_concat", "reduce", "reduce_concat") if k not in d]
        if missing:
            raise GenotypeError(f"genotype misses {', '.join(missing)}")
        known = {"normal", "normal_concat", "reduce", "reduce_concat", "normal_nodes", "reduce_nodes", "meta"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GenotypeError(f"genotype has unknown key(s) {', '.join(unknown)}")
        try:
            return cls(
                [(e[0], e[1]) for e in d["normal"]],
                list(d["normal_concat"]),
                [(e[0], e[1]) for e in d["reduce"]],
                list(d["reduce_concat"]),
                None if d.get("normal_nodes") is None else list(d["normal_nodes"]),
                None if d.get("reduce_nodes") is None else list(d["reduce_nodes"]),
                dict(d.get("meta") or {}),
            )
        except (TypeError, IndexError, ValueError) as e:
            if isinstance(e, GenotypeError):
                raise
            raise GenotypeError(f"genotype edges must be [operation, input] pairs ({e})") from None

    def to_json(self, indent: int | None = 1) -> str:
        """JSON with one line per field (edges inline), or compact with `indent=None`."""
        d = self.to_dict()
        if indent is None:
            return json.dumps(d)
        pad = " " * indent
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {json.dumps(v)}" for k, v in d.items()) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype JSON does not parse: {e}") from None

    # ---- the DARTS code's literal ---------------------------------------------------------------
    def to_darts(self) -> str:
        """The DARTS code's `Genotype(...)` literal (only for the two-edges-per-node layout)."""
        if self.normal_nodes is not None or self.reduce_nodes is not None:
            raise GenotypeError("this genotype has cells with other than two edges per node; write it as JSON")

        def concat(c: list[int]) -> str:
            return f"range({c[0]}, {c[-1] + 1})" if c == list(range(c[0], c[-1] + 1)) else repr(c)

        return (
            f"Genotype(normal={self.normal!r}, normal_concat={concat(self.normal_concat)}, "
            f"reduce={self.reduce!r}, reduce_concat={concat(self.reduce_concat)})"
        )

    @classmethod
    def parse(cls, text: str) -> Genotype:
        """Read JSON or the DARTS code's `Genotype(normal=[...], normal_concat=range(2, 6), ...)` literal."""
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json(text)
        try:
            call = ast.parse(text, mode="eval").body
        except SyntaxError as e:
            raise GenotypeError(f"not a genotype literal or JSON: {e.msg}") from None
        if not isinstance(call, ast.Call) or getattr(call.func, "id", None) != "Genotype" or call.args:
            raise GenotypeError("a genotype literal looks like Genotype(normal=[...], normal_concat=..., ...)")
        fields: dict[str, Any] = {}
        for kw in call.keywords:
            v = kw.value
            if isinstance(v, ast.Call) and getattr(v.func, "id", None) == "range":
                fields[kw.arg] = list(range(*[ast.literal_eval(a) for a in v.args]))
            else:
                try:
                    fields[kw.arg] = ast.literal_eval(v)
                except ValueError:
                    raise GenotypeError(f"genotype field {kw.arg!r} is not a literal") from None
        return cls.from_dict(fields)

    def __str__(self) -> str:
        try:
            return self.to_darts()
        except GenotypeError:
            return self.to_json(indent=None)


# Published cells (the DARTS paper's figures; first and second order, CIFAR-10).
GENOTYPES: dict[str, Genotype] = {
    "darts_v1": Genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
        reduce_concat=[2, 3, 4, 5],
    ),
    "darts_v2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5],
    ),
}
GENOTYPES["darts"] = GENOTYPES["darts_v2"]


def load_genotype(source: str | Path | Genotype | dict[str, Any]) -> Genotype:
    """A genotype from a published name (`darts_v2`), a JSON / DARTS-literal file, a literal string or a mapping."""
    if isinstance(source, Genotype):
        return source
    if isinstance(source, dict):
        return Genotype.from_dict(source)
    key = str(source).strip().lower().replace("-", "_")
    if key in GENOTYPES:
        return GENOTYPES[key]
    text = str(source).strip()
    if text.startswith("{") or text.startswith("Genotype("):
        return Genotype.parse(text)
    path = Path(source).expanduser()
    if not path.is_file():
        raise GenotypeError(
            f"genotype {str(source)!r} is neither a published name ({', '.join(sorted(GENOTYPES))}) nor a file"
        )
    return Genotype.parse(path.read_text())
