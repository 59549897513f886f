"""Find growable groups by propagating channel layouts through the captured graph: the driver.

Every tensor dimension gets a *layout*: `None` when its size is fixed (batch, spatial, model input),
or a tuple of segments `(group id, inner)` / `(None, size)` when its positions carry the units of
one or more groups (several after a `torch.cat`; `inner > 1` after a flatten). Each op has a rule
that maps input layouts to output layouts and records which (tensor, dim) follow a group: modules
through their `LayerRule` (`rules`, `builtin_rules`), functions and tensor methods through the
shape-op rules (`shapeops`). Ops that combine two growable dims union their groups (residual adds).
An op without a rule, a reduction over a grown dim or a model output *blocks* the groups it touches,
with the reason.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import GrowthError
from . import builtin_rules as _builtin  # noqa: F401 - registers the built-in layer rules
from . import norm_stream as _norm_stream  # noqa: F401 - LayerNorm, RMSNorm and their stream completion
from . import torch_attention as _torch_attention  # noqa: F401 - nn.MultiheadAttention, TransformerEncoderLayer
from . import torchvision_rules as _torchvision  # noqa: F401 - rules for torchvision's own layers
from .graph import Boundary, Constraint, Group, GrowthGraph, Member
from .rules import LAYER_RULES, ModuleRule, is_leaf, leaf_types, load_optional_rules, register_module_rule, rule_for
from .shapeops import FUNCTION_RULES, METHOD_RULES
from .trace import NO_SOURCE, as_input_tuple, module_of, source_of, trace_with_shapes

Seg = tuple[Any, int]  # (group id, inner) or (None, fixed size)
DimLayout = tuple[Seg, ...] | None
Layout = list[DimLayout]

MODULE_RULES = LAYER_RULES  # the one registry (kept under its old name for existing callers)

__all__ = ["ModuleRule", "Propagation", "analyze", "register_module_rule"]


def _fname(target: Any) -> str:
    return getattr(target, "__name__", str(target))


class Propagation:
    """The state of one analysis: union-find over groups, their members, and each node's layout."""

    def __init__(self, gm: fx.GraphModule, excluded: set[str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.excluded = excluded
        self.parent: list[int] = []
        self.widths: list[int] = []
        self.names: list[str] = []
        self.members: list[list[Member]] = []
        self.constraints: list[list[Constraint]] = []
        self.blocked: list[tuple[str, str] | None] = []
        self.producers: list[list[str]] = []
        self.channel_dims: list[list[tuple[str, int]]] = []
        self.at_output: list[bool] = []
        self.env: dict[fx.Node, Any] = {}
        self.used_sources = False  # a block reason needed the user's source line
        # what a rule can only finish once every group is known (`defer`): run in order after the graph
        self.deferred: dict[str, Callable[[Propagation], None]] = {}
        self.notes: dict[str, list[Any]] = {}  # what those rules recorded for it, by key

    # ---- union-find over groups -------------------------------------------------------------
    def new_group(self, width: int, name: str) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.widths.append(width)
        self.names.append(name)
        self.members.append([])
        self.constraints.append([])
        self.blocked.append(None)
        self.producers.append([name])
        self.channel_dims.append([])
        self.at_output.append(False)
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, node: fx.Node) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a > b:
            a, b = b, a
        if self.widths[a] != self.widths[b]:
            self.block(a, "UnsupportedOpError", f"{source_of(node)} ties groups of different widths")
        self.parent[b] = a
        self.members[a] += self.members[b]
        self.constraints[a] += self.constraints[b]
        self.producers[a] += self.producers[b]
        self.channel_dims[a] += self.channel_dims[b]
        self.at_output[a] = self.at_output[a] or self.at_output[b]
        if self.blocked[a] is None:
            self.blocked[a] = self.blocked[b]
        return a

    def defer(self, key: str, finish: Callable[[Propagation], None], note: Any) -> None:
        """Record `note` under `key` and run `finish(self)` once after propagation, when every group has all its
        members (nn.MultiheadAttention's head_dim group is built from the whole stream it reads)."""
        self.deferred.setdefault(key, finish)
        self.notes.setdefault(key, []).append(note)

    def block(self, g: int, kind: str, reason: str) -> None:
        g = self.find(g)
        if self.blocked[g] is None:
            self.blocked[g] = (kind, reason)
            self.used_sources |= NO_SOURCE in reason

    def block_layout(self, layout: Any, kind: str, reason: str) -> None:
        for g in self.groups_in(layout):
            self.block(g, kind, reason)

    def groups_in(self, layout: Any) -> set[int]:
        out: set[int] = set()
        if layout is None:
            return out
        if isinstance(layout, tuple) and layout and isinstance(layout[0], list):
            for sub in layout:
                out |= self.groups_in(sub)
            return out
        if isinstance(layout, list):
            for dl in layout:
                if dl is not None:
                    out |= {self.find(g) for g, _ in dl if g is not None}
        return out

    def add_members(
        self, dl: DimLayout, tensor: str, dim: int, role: str, kind: str, module: str, scales: Any = None
    ) -> None:
        """Record that `tensor`'s `dim` follows the units laid out by `dl`; `scales(g)`, for a multiplier, names
        the one module whose producer slices of group g it multiplies (LayerScale after a branch's projection)."""
        if dl is None:
            return
        offset = 0
        for g, n in dl:
            if g is None:
                offset += n
                continue
            g = self.find(g)
            self.members[g].append(Member(tensor, dim, role, kind, module, offset, n, scales=scales(g) if scales
                                          else ""))
            offset += self.widths[g] * n

    def sole_producer(self, g: int) -> str:
        """The module of group g's producers when there is exactly one (a branch's projection), else ""."""
        modules = {m.module for m in self.members[self.find(g)] if m.role == "producer"}
        return modules.pop() if len(modules) == 1 else ""

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def shape(x: Any) -> tuple[int, ...] | None:
        if isinstance(x, fx.Node):
            tm = x.meta.get("tensor_meta")
            if isinstance(tm, TensorMetadata):
                return tuple(tm.shape)
        return None

    def layout(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            return self.env.get(x)
        return None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        out: list[fx.Node] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                if self.shape(a) is not None or isinstance(self.env.get(a), tuple):
                    out.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return out

    def fixed(self, n: int) -> Layout:
        return [None] * n

    def layout_or_fixed(self, x: Any) -> tuple[Layout, tuple[int, ...]]:
        """`x`'s layout (all-fixed when it carries no units) and its shape."""
        s = self.shape(x)
        return (self.env.get(x) or self.fixed(len(s))), s

    def has_multiple_outputs(self, node: fx.Node) -> bool:
        tm = node.meta.get("tensor_meta")
        return isinstance(tm, (tuple, list)) and not isinstance(tm, TensorMetadata)

    def output_shapes(self, node: fx.Node) -> list[tuple[int, ...] | None]:
        """Shapes of a node's outputs (one entry for a single tensor)."""
        if not self.has_multiple_outputs(node):
            return [self.shape(node)]
        return [tuple(t.shape) if isinstance(t, TensorMetadata) else None for t in node.meta["tensor_meta"]]

    def block_unknown(self, node: fx.Node, what: str) -> Any:
        where = module_of(node) if node.op != "call_module" else ""
        reason = f"{what}{where} at {source_of(node)} has no channel rule (register a module rule or exclude it)"
        for a in self.tensor_args(node):
            self.block_layout(self.env.get(a), "UnsupportedOpError", reason)
        s = self.shape(node)
        return self.fixed(len(s)) if s is not None else None

    def norm_dim(self, d: int, n: int) -> int:
        return d + n if d < 0 else d

    # ---- dispatch ---------------------------------------------------------------------------------
    def call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        m = self.modules[name]
        out_s = self.shape(node)
        if name in self.excluded:
            for x in self.tensor_args(node):
                self.block_layout(self.env.get(x), "FrozenGroupError", f"module {name!r} is excluded from growth")
            return self.fixed(len(out_s)) if out_s else None
        rule = rule_for(m)
        if rule is None:
            return self.block_unknown(node, f"module {name!r} ({type(m).__name__})")
        return rule.propagate(self, node, m, name)

    def call_function(self, node: fx.Node) -> Any:
        t = node.target
        if self.shape(node) is None and not isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            if t is operator.getitem and isinstance(self.env.get(node.args[0]), tuple):
                return self.env[node.args[0]][node.args[1]]
            return None  # ints, sizes, shapes
        rule = FUNCTION_RULES.get(t)
        if rule is None:
            return self.block_unknown(node, f"function {_fname(t)}")
        return rule(self, node)

    def call_method(self, node: fx.Node) -> Any:
        rule = METHOD_RULES.get(str(node.target))
        if self.shape(node) is None:
            if isinstance(node.meta.get("tensor_meta"), (tuple, list)):  # x.split(…), x.chunk(…): several tensors
                return rule(self, node) if rule is not None else self.block_unknown(node, f"method .{node.target}()")
            return None
        if rule is None:
            return self.block_unknown(node, f"method .{node.target}()")
        return rule(self, node)

    # ---- driver ---------------------------------------------------------------------------------
    def run(self) -> None:
        """Propagate layouts through the graph; a rule that fails becomes one line naming the node."""
        for node in self.gm.graph.nodes:
            try:
                self._visit(node)
            except GrowthError:
                raise
            except Exception as e:  # noqa: BLE001 - a rule's own failure blocks what the node touches
                self.env[node] = self._failed(node, e)
        for finish in self.deferred.values():
            finish(self)

    def _failed(self, node: fx.Node, e: Exception) -> Any:
        """A node whose rule failed (an internal error): the groups it reads are blocked, the reason naming the
        op, the module and the user's source line; its output is fixed, so the analysis goes on."""
        what = f"{node.op} {getattr(node.target, '__name__', node.target)}"
        where = module_of(node) if node.op != "call_module" else ""
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        reason = (
            f"{what}{where} at {source_of(node)} cannot be analysed ({type(e).__name__}: {msg}); "
            "exclude that module or register a rule"
        )
        for a in self.tensor_args(node):
            self.block_layout(self.env.get(a), "UnsupportedOpError", reason)
        s = self.shape(node)
        return self.fixed(len(s)) if isinstance(s, (tuple, list)) else None

    def _visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            s = self.shape(node)
            self.env[node] = self.fixed(len(s)) if s is not None else None
        elif node.op == "call_module":
            self.env[node] = self.call_module(node)
        elif node.op == "call_function":
            self.env[node] = self.call_function(node)
        elif node.op == "call_method":
            self.env[node] = self.call_method(node)
        elif node.op == "output":
            for a in self.tensor_args(node):
                for g in self.groups_in(self.env.get(a)):
                    self.at_output[g] = True
                self.block_layout(self.env.get(a), "FrozenGroupError", "its units reach the model output")

    def result(self, input_shapes: list[tuple[int, ...]]) -> GrowthGraph:
        groups: dict[str, Group] = {}
        for gid in range(len(self.parent)):
            if self.find(gid) != gid:
                continue
            members = list(dict.fromkeys(self.members[gid]))
            constraints = list(dict.fromkeys(self.constraints[gid]))
            name = self.names[gid]
            groups[name] = Group(
                name,
                self.widths[gid],
                members,
                constraints,
                self.blocked[gid],
                list(dict.fromkeys(self.producers[gid])),
                self.channel_dims[gid],
                self.at_output[gid],
            )
        aliases = {
            self.names[gid]: self.names[self.find(gid)]
            for gid in range(len(self.parent))
            if self.find(gid) != gid and self.names[gid] not in groups
        }
        return GrowthGraph(groups, self.boundaries(), input_shapes, aliases)

    def boundaries(self) -> dict[str, Boundary]:
        """Modules (leaf or block) with a single tensor output whose units belong to one group."""
        nodes = list(self.gm.graph.nodes)
        inside: dict[str, list[fx.Node]] = {}
        for node in nodes:
            for path in node.meta.get("nn_module_stack") or {}:
                inside.setdefault(path, []).append(node)
            if node.op == "call_module":
                inside.setdefault(str(node.target), [])
                if node not in inside[str(node.target)]:
                    inside[str(node.target)].append(node)
        out: dict[str, Boundary] = {}
        for path, members in inside.items():
            if not path or path in self.excluded:
                continue
            mset = set(members)
            exits = [n for n in members if any(u not in mset for u in n.users)]
            if len(exits) != 1:
                continue
            node = exits[0]
            lay, s = self.env.get(node), self.shape(node)
            if s is None or not isinstance(lay, list):
                continue
            dims = [(d, dl) for d, dl in enumerate(lay) if dl is not None]
            if len(dims) != 1 or len(dims[0][1]) != 1 or dims[0][1][0][1] != 1:
                continue
            d, dl = dims[0]
            g = self.find(dl[0][0])
            out[path] = Boundary(path, self.names[g], s[d], d, len(s), s, node.name)
        return out


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: list[str] | None = None,
) -> GrowthGraph:
    """Find the growable groups of `model` (traced on a meta-device copy: no real memory is used).

    `exclude` names submodules to treat as opaque: groups touching them cannot grow.
    """
    load_optional_rules()
    excluded = set(exclude or [])
    unknown = sorted(excluded - {name for name, _ in model.named_modules()})
    if unknown:
        close = difflib.get_close_matches(unknown[0], [n for n, _ in model.named_modules() if n], n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise GrowthError(f"exclude: {type(model).__name__} has no submodule {unknown[0]!r}{hint}")
    extra = leaf_types()
    gm = trace_with_shapes(model, example_inputs, extra_leaves=extra, leaf_names=excluded, is_leaf=is_leaf)
    a = Propagation(gm, excluded)
    a.run()
    if a.used_sources:  # a reason quotes user code: trace again, recording stack traces (slow, so only now)
        gm = trace_with_shapes(
            model, example_inputs, extra_leaves=extra, leaf_names=excluded, stack_traces=True, is_leaf=is_leaf
        )
        a = Propagation(gm, excluded)
        a.run()
    return a.result([tuple(t.shape) for t in as_input_tuple(example_inputs)])
