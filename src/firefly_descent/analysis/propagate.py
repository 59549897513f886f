"""Find growable groups by propagating channel layouts through the traced graph.

Every tensor dimension gets a *layout*: `None` when its size is fixed (batch, spatial, model input),
or a tuple of segments `(group id, inner)` / `(None, size)` when its positions carry the units of
one or more groups (several after a `torch.cat`; `inner > 1` after a flatten). Each op has a rule
that maps input layouts to output layouts and records which (tensor, dim) follow a group; ops
that combine two growable dims union their groups (residual adds). An op without a rule, a
reduction over a grown dim or a model output *blocks* the groups it touches, with the reason.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from .graph import Boundary, Constraint, Group, GrowthGraph, Member
from .trace import NO_SOURCE, source_of

Seg = tuple[Any, int]  # (group id, inner) or (None, fixed size)
DimLayout = tuple[Seg, ...] | None
Layout = list[DimLayout]


@dataclass
class ModuleRule:
    """How an opaque module's parameters follow the widths of its inputs and outputs.

    consumes: (arg index, dim, [(param name, param dim)]) - the param dims that read an input's units.
    produces: (output index or None for a single tensor, dim, [(param name, param dim)]) - a new group.
    passes:   (arg index, in dim, output index or None, out dim) - units flow through unchanged.
    rederive: called after the engine edited the module's parameters, to update its attributes.
    """

    consumes: list[tuple[int, int, list[tuple[str, int]]]] = field(default_factory=list)
    produces: list[tuple[int | None, int, list[tuple[str, int]]]] = field(default_factory=list)
    passes: list[tuple[int, int, int | None, int]] = field(default_factory=list)
    rederive: Callable[[nn.Module], None] | None = None


MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}


def register_module_rule(module_type: type[nn.Module], rule: ModuleRule) -> None:
    """Teach the analysis (and the engine) how an opaque module type grows."""
    MODULE_RULES[module_type] = rule


UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softplus,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Hardtanh,
    nn.SELU,
    nn.CELU,
    nn.Softsign,
)
POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.ZeroPad2d,
)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

ADDITIVE_FUNCS = {operator.add, operator.sub, torch.add, torch.sub, operator.iadd}
MULTIPLICATIVE_FUNCS = {operator.mul, operator.truediv, torch.mul, torch.div, operator.imul}
ADDITIVE_METHODS = {"add", "sub", "add_", "sub_"}
MULTIPLICATIVE_METHODS = {"mul", "div", "mul_", "div_"}
UNARY_FUNCS = {
    torch.relu,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.softplus,
    F.mish,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    torch.nn.functional.hardtanh,
    torch.abs,
    torch.neg,
    torch.exp,
    operator.neg,
    F.selu,
    torch.square,
    torch.clamp,
    torch.clip,
    torch.sqrt,
    torch.rsqrt,
}
UNARY_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "float",
    "double",
    "half",
    "to",
    "type_as",
    "detach",
    "abs",
    "neg",
    "exp",
    "clamp",
    "clamp_",
    "square",
    "sqrt",
    "pow",
    "__pow__",
    "requires_grad_",
}
POOL_FUNCS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.interpolate,
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm", "argmax"}
SOFTMAX = {"softmax", "log_softmax"}


def _fname(target: Any) -> str:
    return getattr(target, "__name__", str(target))


class _Analysis:
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
        self.env: dict[fx.Node, Any] = {}
        self.used_sources = False  # a block reason needed the user's source line

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
        if self.blocked[a] is None:
            self.blocked[a] = self.blocked[b]
        return a

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

    def add_members(self, dl: DimLayout, tensor: str, dim: int, role: str, kind: str, module: str) -> None:
        """Record that `tensor`'s `dim` follows the units laid out by `dl`."""
        if dl is None:
            return
        offset = 0
        for g, n in dl:
            if g is None:
                offset += n
                continue
            g = self.find(g)
            self.members[g].append(Member(tensor, dim, role, kind, module, offset, n))
            offset += self.widths[g] * n

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

    def block_unknown(self, node: fx.Node, what: str) -> Any:
        reason = f"{what} at {source_of(node)} has no channel rule (register a module rule or exclude it)"
        for a in self.tensor_args(node):
            self.block_layout(self.env.get(a), "UnsupportedOpError", reason)
        s = self.shape(node)
        return self.fixed(len(s)) if s is not None else None

    def norm_dim(self, d: int, n: int) -> int:
        return d + n if d < 0 else d

    # ---- rules ----------------------------------------------------------------------------------
    def unify(self, node: fx.Node, contributions: list[tuple[DimLayout, Any, int]], op_kind: str) -> DimLayout:
        """Combine the layouts that meet at one output dim of an elementwise op."""
        growable = [(dl, src, dim) for dl, src, dim in contributions if dl is not None]
        if not growable:
            return None
        fixed = [(src, dim) for dl, src, dim in contributions if dl is None]
        first = growable[0][0]
        for dl, _, _ in growable[1:]:
            if len(dl) != len(first) or any(
                (a[0] is None) != (b[0] is None) or a[1] != b[1] for a, b in zip(dl, first)
            ):
                self.block_layout(
                    [first, dl],
                    "UnsupportedOpError",
                    f"{source_of(node)} combines tensors whose units are laid out differently",
                )
                return first
            for a, b in zip(dl, first):
                if a[0] is not None:
                    self.union(a[0], b[0], node)
        for src, dim in fixed:
            if isinstance(src, fx.Node) and src.op == "get_attr":
                kind = "multiplicative" if op_kind == "mul" else "additive"
                self.add_members(first, str(src.target), dim, "elementwise", kind, str(src.target).rpartition(".")[0])
            else:
                self.block_layout(
                    [first], "FrozenGroupError", f"{source_of(node)} combines its units with a fixed-width tensor"
                )
        return tuple((self.find(g) if g is not None else None, n) for g, n in first)

    def elementwise(self, node: fx.Node, op_kind: str = "add") -> Layout | None:
        out_shape = self.shape(node)
        if out_shape is None:
            return None
        n = len(out_shape)
        args = [a for a in self.tensor_args(node) if self.shape(a) is not None]
        out: Layout = []
        for d in range(n):
            contributions: list[tuple[DimLayout, Any, int]] = []
            for a in args:
                s = self.shape(a)
                lay = self.env.get(a) or self.fixed(len(s))
                k = d - (n - len(s))
                if k < 0:
                    continue
                if s[k] == out_shape[d]:
                    contributions.append((lay[k], a, k))
                elif lay[k] is not None:
                    self.block_layout(
                        [lay[k]], "FrozenGroupError", f"{source_of(node)} broadcasts a size-{s[k]} growable dim"
                    )
            out.append(self.unify(node, contributions, op_kind))
        return out

    def flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> Layout:
        s = self.shape(x)
        lay = self.env.get(x) or self.fixed(len(s))
        n = len(s)
        start, end = self.norm_dim(start, n), self.norm_dim(end, n)
        merged = self.merge(node, s, lay, list(range(start, end + 1)))
        return lay[:start] + [merged] + lay[end + 1 :]

    def merge(self, node: fx.Node, s: tuple[int, ...], lay: Layout, dims: list[int]) -> DimLayout:
        grow = [d for d in dims if lay[d] is not None]
        if not grow:
            return None
        d0 = grow[0]
        if len(grow) > 1 or any(s[d] != 1 for d in dims if d < d0):
            self.block_layout(
                [lay[d] for d in grow],
                "UnsupportedOpError",
                f"{source_of(node)} reshapes a grown dim that is not the outermost of the merged dims",
            )
            return None
        mult = math.prod(s[d] for d in dims if d > d0)
        return tuple((g, k * mult) for g, k in lay[d0])  # type: ignore[union-attr]

    def reshape(self, node: fx.Node, x: fx.Node) -> Layout:
        s_in, s_out = self.shape(x), self.shape(node)
        lay = self.env.get(x) or self.fixed(len(s_in))
        out: Layout = [None] * len(s_out)
        i = j = 0
        while i < len(s_in) or j < len(s_out):
            ins, outs = [i] if i < len(s_in) else [], [j] if j < len(s_out) else []
            pi = s_in[i] if ins else 1
            pj = s_out[j] if outs else 1
            while pi != pj:
                if pi < pj:
                    i += 1
                    ins.append(i)
                    pi *= s_in[i]
                else:
                    j += 1
                    outs.append(j)
                    pj *= s_out[j]
            i, j = i + 1, j + 1
            grown = [d for d in ins if lay[d] is not None]
            if not grown:
                continue
            if len(outs) == 1:
                out[outs[0]] = self.merge(node, s_in, lay, ins)
            else:
                big_out = [d for d in outs if s_out[d] != 1]
                big_in = [d for d in ins if s_in[d] != 1]
                if len(big_out) == 1 and len(big_in) == 1 and s_in[big_in[0]] == s_out[big_out[0]]:
                    out[big_out[0]] = lay[big_in[0]]
                else:
                    self.block_layout(
                        [lay[d] for d in grown],
                        "UnsupportedOpError",
                        f"{source_of(node)} splits a grown dim into several dims",
                    )
        return out

    def reduce(self, node: fx.Node, x: fx.Node, dims: Any, keepdim: bool, name: str) -> Layout | None:
        s = self.shape(x)
        lay = self.env.get(x) or self.fixed(len(s))
        if dims is None:
            dims = list(range(len(s)))
        elif isinstance(dims, int):
            dims = [dims]
        dims = [self.norm_dim(d, len(s)) for d in dims]
        for d in dims:
            if lay[d] is not None:
                self.block_layout(
                    [lay[d]],
                    "ReductionOverGrownDimError",
                    f"{name} over dim {d} at {source_of(node)} reduces over the units, "
                    "so every new unit would change it",
                )
        out_shape = self.shape(node)
        if out_shape is None:
            return None
        if keepdim:
            return [None if d in dims else lay[d] for d in range(len(s))]
        return [lay[d] for d in range(len(s)) if d not in dims]

    def channel_pass(self, node: fx.Node, x: fx.Node, keep: int = 2) -> Layout | None:
        """Pooling-like ops: batch and channel dims keep their layout, the rest become fixed."""
        s, out_s = self.shape(x), self.shape(node)
        if out_s is None:
            return None
        lay = self.env.get(x) or self.fixed(len(s))
        for d in range(keep, len(s)):
            if lay[d] is not None:
                self.block_layout([lay[d]], "UnsupportedOpError", f"{source_of(node)} pools over a grown dim")
        return lay[:keep] + [None] * (len(out_s) - keep)

    def cat(self, node: fx.Node, tensors: list[fx.Node], dim: int) -> Layout:
        out_s = self.shape(node)
        n = len(out_s)
        dim = self.norm_dim(dim, n)
        segs: list[Seg] = []
        for t in tensors:
            lay = self.env.get(t) or self.fixed(n)
            segs += list(lay[dim]) if lay[dim] is not None else [(None, self.shape(t)[dim])]
        out: Layout = []
        for d in range(n):
            if d == dim:
                out.append(tuple(segs) if any(g is not None for g, _ in segs) else None)
            else:
                contributions = [((self.env.get(t) or self.fixed(n))[d], t, d) for t in tensors]
                out.append(self.unify(node, contributions, "add"))
        return out

    # ---- modules ---------------------------------------------------------------------------------
    def call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        m = self.modules[name]
        args = [a for a in node.args if isinstance(a, fx.Node)]
        x = args[0] if args else None
        s = self.shape(x) if x is not None else None
        lay = (self.env.get(x) or (self.fixed(len(s)) if s else None)) if x is not None else None
        out_s = self.shape(node)
        if name in self.excluded:
            for a in self.tensor_args(node):
                self.block_layout(self.env.get(a), "FrozenGroupError", f"module {name!r} is excluded from growth")
            return self.fixed(len(out_s)) if out_s else None
        rule = next((r for t, r in MODULE_RULES.items() if isinstance(m, t)), None)
        if rule is not None:
            return self.module_rule(node, m, name, rule)
        if isinstance(m, nn.Linear):
            self.add_members(lay[-1], f"{name}.weight", 1, "consumer", "weight", name)
            g = self.new_group(m.out_features, name)
            self.members[g].append(Member(f"{name}.weight", 0, "producer", "weight", name))
            if m.bias is not None:
                self.members[g].append(Member(f"{name}.bias", 0, "producer", "bias", name))
            self.channel_dims[g].append((node.name, len(out_s) - 1))
            return lay[:-1] + [((g, 1),)]
        if isinstance(m, CONV_TYPES):
            if any(d is not None for d in lay[2:]):
                self.block_layout(lay[2:], "UnsupportedOpError", f"conv {name!r} slides over a grown dim")
            cin, cout, groups = m.in_channels, m.out_channels, m.groups
            if groups == 1:
                self.add_members(lay[1], f"{name}.weight", 1, "consumer", "weight", name)
                g = self.new_group(cout, name)
                self.members[g].append(Member(f"{name}.weight", 0, "producer", "weight", name))
                if m.bias is not None:
                    self.members[g].append(Member(f"{name}.bias", 0, "producer", "bias", name))
                self.channel_dims[g].append((node.name, 1))
                return [lay[0], ((g, 1),)] + [None] * (len(out_s) - 2)
            if groups == cin == cout:
                if lay[1] is not None:
                    self.add_members(lay[1], f"{name}.weight", 0, "passthrough", "weight", name)
                    if m.bias is not None:
                        self.add_members(lay[1], f"{name}.bias", 0, "passthrough", "bias", name)
                return [lay[0], lay[1]] + [None] * (len(out_s) - 2)
            reason = f"grouped conv {name!r} (groups={groups}) can only grow as a depthwise conv"
            self.block_layout([lay[1]], "UnsupportedOpError", reason)
            g = self.new_group(cout, name)
            self.block(g, "UnsupportedOpError", reason)
            return [lay[0], ((g, 1),)] + [None] * (len(out_s) - 2)
        if isinstance(m, BN_TYPES) or isinstance(m, nn.GroupNorm):
            dl = lay[1]
            if dl is not None:
                if m.weight is not None:
                    self.add_members(dl, f"{name}.weight", 0, "norm", "norm_weight", name)
                    self.add_members(dl, f"{name}.bias", 0, "norm", "norm_bias", name)
                if isinstance(m, nn.GroupNorm):
                    groups = {self.find(g) for g, _ in dl if g is not None}
                    if len(dl) != 1:
                        self.block_layout(
                            [dl], "UnsupportedOpError", f"GroupNorm {name!r} normalises a concatenation of groups"
                        )
                    for g in groups:
                        self.constraints[g].append(Constraint("groupnorm", name, m.num_channels // m.num_groups))
                elif m.track_running_stats and m.running_mean is not None:
                    self.add_members(dl, f"{name}.running_mean", 0, "norm", "running_mean", name)
                    self.add_members(dl, f"{name}.running_var", 0, "norm", "running_var", name)
            return list(lay)
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            normed = lay[len(lay) - k :]
            if any(d is not None for d in normed):
                if k != 1:
                    self.block_layout(
                        normed,
                        "UnsupportedOpError",
                        f"LayerNorm {name!r} normalises several dims including a grown one",
                    )
                else:
                    dl = normed[0]
                    if m.weight is not None:
                        self.add_members(dl, f"{name}.weight", 0, "norm", "norm_weight", name)
                    if m.bias is not None:
                        self.add_members(dl, f"{name}.bias", 0, "norm", "norm_bias", name)
                    for g, _ in dl:
                        if g is not None:
                            self.constraints[self.find(g)].append(Constraint("layernorm", name))
            return list(lay)
        if isinstance(m, UNARY_MODULES):
            return list(lay) if lay is not None else None
        if isinstance(m, POOL_MODULES):
            return self.channel_pass(node, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, nn.Unflatten):
            return self.reshape(node, x)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            d = self.norm_dim(m.dim if m.dim is not None else -1, len(s))
            if lay[d] is not None:
                self.block_layout(
                    [lay[d]],
                    "ReductionOverGrownDimError",
                    f"softmax over dim {d} at {source_of(node)} normalises over the units",
                )
            return list(lay)
        if isinstance(m, nn.MultiheadAttention):
            for a in self.tensor_args(node):
                self.block_layout(
                    self.env.get(a),
                    "FrozenGroupError",
                    f"nn.MultiheadAttention {name!r} has a fixed embedding width (register a module rule to grow it)",
                )
            return None
        return self.block_unknown(node, f"module {name!r} ({type(m).__name__})")

    def module_rule(self, node: fx.Node, m: nn.Module, name: str, rule: ModuleRule) -> Any:
        args = list(node.args)
        tm = node.meta.get("tensor_meta")
        multi = isinstance(tm, (tuple, list)) and not isinstance(tm, TensorMetadata)
        out_shapes = (
            [tuple(t.shape) if isinstance(t, TensorMetadata) else None for t in tm] if multi else [self.shape(node)]
        )
        outs: list[Layout | None] = [self.fixed(len(s)) if s is not None else None for s in out_shapes]
        handled: set[tuple[int, int]] = set()
        for arg_i, dim, params in rule.consumes:
            a = args[arg_i]
            s = self.shape(a)
            lay = self.env.get(a) or self.fixed(len(s))
            d = self.norm_dim(dim, len(s))
            handled.add((arg_i, d))
            for pname, pdim in params:
                self.add_members(lay[d], f"{name}.{pname}", pdim, "consumer", "weight", name)
        for arg_i, in_dim, out_i, out_dim in rule.passes:
            a = args[arg_i]
            s = self.shape(a)
            lay = self.env.get(a) or self.fixed(len(s))
            oi = out_i or 0
            outs[oi][self.norm_dim(out_dim, len(out_shapes[oi]))] = lay[self.norm_dim(in_dim, len(s))]
            handled.add((arg_i, self.norm_dim(in_dim, len(s))))
        for out_i, dim, params in rule.produces:
            oi = out_i or 0
            d = self.norm_dim(dim, len(out_shapes[oi]))
            g = self.new_group(out_shapes[oi][d], name)
            for pname, pdim in params:
                kind = "bias" if pname.endswith("bias") else "weight"
                self.members[g].append(Member(f"{name}.{pname}", pdim, "producer", kind, name))
            outs[oi][d] = ((g, 1),)
        for i, a in enumerate(args):
            if isinstance(a, fx.Node) and self.shape(a) is not None:
                lay = self.env.get(a) or []
                for d, dl in enumerate(lay):
                    if dl is not None and (i, d) not in handled:
                        self.block_layout(
                            [dl],
                            "UnsupportedOpError",
                            f"module rule of {name!r} does not say how input {i} dim {d} grows",
                        )
        return tuple(outs) if multi else outs[0]

    # ---- functions and methods --------------------------------------------------------------------
    def call_function(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        if self.shape(node) is None and not isinstance(node.meta.get("tensor_meta"), (tuple, list)):
            if t is operator.getitem and isinstance(self.env.get(args[0]), tuple):
                return self.env[args[0]][args[1]]
            return None  # ints, sizes, shapes
        if t in ADDITIVE_FUNCS:
            return self.elementwise(node, "add")
        if t in MULTIPLICATIVE_FUNCS:
            return self.elementwise(node, "mul")
        if t in UNARY_FUNCS or t in (torch.where, torch.maximum, torch.minimum):
            return self.elementwise(node, "add")
        if t in POOL_FUNCS:
            return self.channel_pass(node, args[0])
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, args[0], start, end)
        if t is torch.cat or t is torch.concat:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.cat(node, list(args[0]), dim)
        if t is operator.getitem:
            return self.getitem(node)
        if t in (torch.reshape,):
            return self.reshape(node, args[0])
        if t in (torch.transpose, torch.swapaxes):
            return self.transpose(node, args[0], args[1], args[2])
        if t is torch.permute:
            return self.permute(node, args[0], args[1])
        if t in (torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.std, torch.var):
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self.reduce(node, args[0], dims, keep, _fname(t))
        if t in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            return self.softmax(node, args[0], args[1] if len(args) > 1 else node.kwargs.get("dim"))
        if t in (torch.unsqueeze,):
            return self.unsqueeze(node, args[0], args[1])
        if t in (torch.squeeze,):
            return self.squeeze(node, args[0], args[1] if len(args) > 1 else None)
        return self.block_unknown(node, f"function {_fname(t)}")

    def call_method(self, node: fx.Node) -> Any:
        name = str(node.target)
        args = node.args
        if self.shape(node) is None:
            return None
        x = args[0]
        if name in ADDITIVE_METHODS:
            return self.elementwise(node, "add")
        if name in MULTIPLICATIVE_METHODS:
            return self.elementwise(node, "mul")
        if name in UNARY_METHODS or name in ("expand", "expand_as", "masked_fill"):
            return self.elementwise(node, "add")
        if name in ("view", "reshape"):
            return self.reshape(node, x)
        if name == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, start, end)
        if name in REDUCTIONS:
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            return self.reduce(node, x, dims, keep, name)
        if name in SOFTMAX:
            return self.softmax(node, x, args[1] if len(args) > 1 else node.kwargs.get("dim"))
        if name == "permute":
            dims = args[1:] if not isinstance(args[1], (list, tuple)) else args[1]
            return self.permute(node, x, dims)
        if name == "transpose":
            return self.transpose(node, x, args[1], args[2])
        if name == "unsqueeze":
            return self.unsqueeze(node, x, args[1])
        if name == "squeeze":
            return self.squeeze(node, x, args[1] if len(args) > 1 else None)
        return self.block_unknown(node, f"method .{name}()")

    def getitem(self, node: fx.Node) -> Any:
        x, idx = node.args[0], node.args[1]
        if isinstance(self.env.get(x), tuple):
            return self.env[x][idx]
        s = self.shape(x)
        if s is None:  # an element of an opaque module's tuple output: fixed
            out_s = self.shape(node)
            return self.fixed(len(out_s)) if out_s is not None else None
        lay = self.env.get(x) or self.fixed(len(s))
        idx = idx if isinstance(idx, tuple) else (idx,)
        out: Layout = []
        d = 0
        for k, it in enumerate(idx):
            if it is Ellipsis:
                rest = len(idx) - k - 1 - sum(1 for i in idx[k + 1 :] if i is None)
                while d < len(s) - rest:
                    out.append(lay[d])
                    d += 1
            elif it is None:
                out.append(None)
            elif isinstance(it, slice) and it == slice(None):
                out.append(lay[d])
                d += 1
            elif isinstance(it, (int, slice)):
                if lay[d] is not None:
                    self.block_layout([lay[d]], "UnsupportedOpError", f"{source_of(node)} indexes into a grown dim")
                if isinstance(it, slice):
                    out.append(None)
                d += 1
            else:
                return self.block_unknown(node, "tensor indexing")
        out += lay[d:]
        return out

    def softmax(self, node: fx.Node, x: fx.Node, dim: int) -> Layout:
        s = self.shape(x)
        lay = self.env.get(x) or self.fixed(len(s))
        d = self.norm_dim(dim if dim is not None else -1, len(s))
        if lay[d] is not None:
            self.block_layout(
                [lay[d]],
                "ReductionOverGrownDimError",
                f"softmax over dim {d} at {source_of(node)} normalises over the units",
            )
        return list(lay)

    def transpose(self, node: fx.Node, x: fx.Node, a: int, b: int) -> Layout:
        s = self.shape(x)
        lay = list(self.env.get(x) or self.fixed(len(s)))
        a, b = self.norm_dim(a, len(s)), self.norm_dim(b, len(s))
        lay[a], lay[b] = lay[b], lay[a]
        return lay

    def permute(self, node: fx.Node, x: fx.Node, dims: Any) -> Layout:
        s = self.shape(x)
        lay = self.env.get(x) or self.fixed(len(s))
        return [lay[self.norm_dim(d, len(s))] for d in dims]

    def unsqueeze(self, node: fx.Node, x: fx.Node, dim: int) -> Layout:
        s = self.shape(x)
        lay = list(self.env.get(x) or self.fixed(len(s)))
        lay.insert(self.norm_dim(dim, len(s) + 1), None)
        return lay

    def squeeze(self, node: fx.Node, x: fx.Node, dim: Any) -> Layout:
        s = self.shape(x)
        lay = self.env.get(x) or self.fixed(len(s))
        if dim is None:
            dims = [d for d in range(len(s)) if s[d] == 1]
        else:
            dims = [self.norm_dim(d, len(s)) for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
            dims = [d for d in dims if s[d] == 1]
        return [lay[d] for d in range(len(s)) if d not in dims]

    # ---- driver ---------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
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
            )
        return GrowthGraph(groups, self.boundaries(), input_shapes)

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
    from .trace import as_input_tuple, trace_with_shapes

    excluded = set(exclude or [])
    extra = tuple(MODULE_RULES)
    gm = trace_with_shapes(model, example_inputs, extra_leaves=extra, leaf_names=excluded)
    a = _Analysis(gm, excluded)
    a.run()
    if a.used_sources:  # a reason quotes user code: trace again, recording stack traces (slow, so only now)
        gm = trace_with_shapes(model, example_inputs, extra_leaves=extra, leaf_names=excluded, stack_traces=True)
        a = _Analysis(gm, excluded)
        a.run()
    return a.result([tuple(t.shape) for t in as_input_tuple(example_inputs)])
