"""Channel rules of shape ops: elementwise, reshape, cat, reductions, indexing, permutes.

Each rule maps the layouts of a function's or method's tensor arguments to the layout of its output
(see `propagate` for what a layout is), unifying groups that meet elementwise and blocking those an op
cannot carry. Rules are looked up by the traced target: `FUNCTION_RULES[torch.cat]`,
`METHOD_RULES["view"]`; `register_function_rule` adds one.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import Constraint
from .rules import register_constraint
from .trace import source_of

if TYPE_CHECKING:
    from .propagate import DimLayout, Layout, Propagation, Seg

ShapeRule = Callable[["Propagation", fx.Node], Any]

FUNCTION_RULES: dict[Any, ShapeRule] = {}
METHOD_RULES: dict[str, ShapeRule] = {}


def register_function_rule(target: Any, rule: ShapeRule) -> None:
    """Teach the analysis how a function (`torch.foo`) or, given a string, a tensor method carries channels."""
    if isinstance(target, str):
        METHOD_RULES[target] = rule
    else:
        FUNCTION_RULES[target] = rule


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


# ---- elementwise -------------------------------------------------------------------------------
# Ops that act per element (or per sample) and never mix positions of a dim: units flow through. Activations
# (F.relu, torch.tanh, "relu", ...) are registered with this same rule by `activations.register_activation`.
PER_ELEMENT_FUNCS: set[Any] = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    torch.abs,
    torch.neg,
    torch.exp,
    operator.neg,
    torch.square,
    torch.clamp,
    torch.clip,
    torch.sqrt,
    torch.rsqrt,
    torch.where,
    torch.maximum,
    torch.minimum,
}
PER_ELEMENT_METHODS = {
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
    "expand",
    "expand_as",
    "masked_fill",
}
ADDITIVE_FUNCS = {operator.add, operator.sub, torch.add, torch.sub, operator.iadd}
MULTIPLICATIVE_FUNCS = {operator.mul, operator.truediv, torch.mul, torch.div, operator.imul}
ADDITIVE_METHODS = {"add", "sub", "add_", "sub_"}
MULTIPLICATIVE_METHODS = {"mul", "div", "mul_", "div_"}

# View-like ops through which a parameter keeps its identity (a class token expanded over the batch).
_VIEW_METHODS = {"expand", "expand_as", "contiguous", "to", "type_as", "clone", "float", "double", "half"}


def param_source(a: Propagation, src: Any, dim: int) -> tuple[str, int] | None:
    """The (parameter, dim) that `src`'s `dim` is a view of, following expand/clone/dtype casts and reshapes that
    only add or drop size-1 dims (ConvNeXt's `gamma.reshape(1, -1, 1, 1)`)."""
    while isinstance(src, fx.Node):
        if src.op == "get_attr":
            return str(src.target), dim
        if src.op == "call_method" and src.target in ("reshape", "view", "unsqueeze", "squeeze"):
            parent = src.args[0]
            s_out, s_in = a.shape(src), a.shape(parent)
            if s_out is None or s_in is None or s_out[dim] == 1:
                return None
            big_out = [d for d, n in enumerate(s_out) if n != 1]
            big_in = [d for d, n in enumerate(s_in) if n != 1]
            if [s_out[d] for d in big_out] != [s_in[d] for d in big_in]:
                return None
            dim, src = big_in[big_out.index(dim)], parent
            continue
        if src.op == "call_method" and src.target == "repeat":  # copies along other dims (SigLIP's probe)
            parent = src.args[0]
            s_out, s_in = a.shape(src), a.shape(parent)
            if s_out is None or s_in is None or len(s_out) != len(s_in) or s_out[dim] != s_in[dim]:
                return None
            src = parent
            continue
        if src.op == "call_method" and src.target in _VIEW_METHODS:
            parent = src.args[0]
            s_out, s_in = a.shape(src), a.shape(parent)
            if s_out is None or s_in is None:
                return None
            dim -= len(s_out) - len(s_in)  # expand may add leading dims
            if dim < 0 or s_in[dim] != s_out[dim + len(s_out) - len(s_in)]:
                return None
            src = parent
            continue
        return None
    return None


def unify(a: Propagation, node: fx.Node, contributions: list[tuple[DimLayout, Any, int]], op_kind: str) -> DimLayout:
    """Combine the layouts that meet at one output dim of an elementwise op."""
    growable = [(dl, src, dim) for dl, src, dim in contributions if dl is not None]
    if not growable:
        return None
    fixed = [(src, dim) for dl, src, dim in contributions if dl is None]
    first = growable[0][0]
    for dl, _, _ in growable[1:]:
        if len(dl) != len(first) or any((x[0] is None) != (y[0] is None) or x[1] != y[1] for x, y in zip(dl, first)):
            a.block_layout(
                [first, dl],
                "UnsupportedOpError",
                f"{source_of(node)} combines tensors whose units are laid out differently",
            )
            return first
        for x, y in zip(dl, first):
            if x[0] is not None:
                a.union(x[0], y[0], node)
    for src, dim in fixed:
        param = param_source(a, src, dim)
        if param is not None:
            kind = "multiplicative" if op_kind == "mul" else "additive"
            scales = a.sole_producer if op_kind == "mul" else None
            a.add_members(first, param[0], param[1], "elementwise", kind, param[0].rpartition(".")[0], scales)
        else:
            a.block_layout(
                [first], "FrozenGroupError", f"{source_of(node)} combines its units with a fixed-width tensor"
            )
    return tuple((a.find(g) if g is not None else None, n) for g, n in first)


def elementwise(a: Propagation, node: fx.Node, op_kind: str = "add") -> Layout | None:
    out_shape = a.shape(node)
    if out_shape is None:
        return None
    n = len(out_shape)
    args = [x for x in a.tensor_args(node) if a.shape(x) is not None]
    out: Layout = []
    for d in range(n):
        contributions: list[tuple[DimLayout, Any, int]] = []
        for x in args:
            lay, s = a.layout_or_fixed(x)
            k = d - (n - len(s))
            if k < 0:
                continue
            if s[k] == out_shape[d]:
                contributions.append((lay[k], x, k))
            elif lay[k] is not None:
                a.block_layout([lay[k]], "FrozenGroupError", f"{source_of(node)} broadcasts a size-{s[k]} growable dim")
        out.append(unify(a, node, contributions, op_kind))
    return out


# ---- reshapes ----------------------------------------------------------------------------------
def merge(a: Propagation, node: fx.Node, s: tuple[int, ...], lay: Layout, dims: list[int]) -> DimLayout:
    """The layout of `dims` merged into one (row-major): each unit of the one grown dim spans the product of the
    dims inside it (`inner`), and the dims outside it repeat its segments (channels-last `flatten`, Swin's patch
    merging `[.., 2, 2, C] -> [.., 4C]`: four segments of the same group)."""
    grow = [d for d in dims if lay[d] is not None]
    if not grow:
        return None
    if len(grow) > 1:
        a.block_layout(
            [lay[d] for d in grow], "UnsupportedOpError", f"{source_of(node)} merges two grown dims into one"
        )
        return None
    d0 = grow[0]
    outer = math.prod(s[d] for d in dims if d < d0)
    mult = math.prod(s[d] for d in dims if d > d0)
    return tuple((g, k * mult) for g, k in lay[d0]) * outer  # type: ignore[union-attr]


def flatten_dims(a: Propagation, node: fx.Node, x: fx.Node, start: int, end: int) -> Layout:
    lay, s = a.layout_or_fixed(x)
    n = len(s)
    start, end = a.norm_dim(start, n), a.norm_dim(end, n)
    merged = merge(a, node, s, lay, list(range(start, end + 1)))
    return lay[:start] + [merged] + lay[end + 1 :]


def flatten(a: Propagation, node: fx.Node) -> Layout:
    return flatten_dims(a, node, node.args[0], _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def reshape(a: Propagation, node: fx.Node) -> Layout:
    x = node.args[0]
    lay, s_in = a.layout_or_fixed(x)
    s_out = a.shape(node)
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
            out[outs[0]] = merge(a, node, s_in, lay, ins)
        else:
            big_out = [d for d in outs if s_out[d] != 1]
            big_in = [d for d in ins if s_in[d] != 1]
            if len(big_out) == 1 and len(big_in) == 1 and s_in[big_in[0]] == s_out[big_out[0]]:
                out[big_out[0]] = lay[big_in[0]]
            else:
                a.block_layout(
                    [lay[d] for d in grown],
                    "UnsupportedOpError",
                    f"{source_of(node)} splits a grown dim into several dims",
                )
    return out


def transpose(a: Propagation, node: fx.Node) -> Layout:
    lay, s = a.layout_or_fixed(node.args[0])
    lay = list(lay)
    i, j = a.norm_dim(node.args[1], len(s)), a.norm_dim(node.args[2], len(s))
    lay[i], lay[j] = lay[j], lay[i]
    return lay


def permute(a: Propagation, node: fx.Node) -> Layout:
    lay, s = a.layout_or_fixed(node.args[0])
    dims = _arg(node, 1, "dims")
    if node.op == "call_method" and not isinstance(dims, (list, tuple)):
        dims = node.args[1:]
    return [lay[a.norm_dim(d, len(s))] for d in dims]


def unsqueeze(a: Propagation, node: fx.Node) -> Layout:
    lay, s = a.layout_or_fixed(node.args[0])
    lay = list(lay)
    lay.insert(a.norm_dim(_arg(node, 1, "dim"), len(s) + 1), None)
    return lay


def squeeze(a: Propagation, node: fx.Node) -> Layout:
    lay, s = a.layout_or_fixed(node.args[0])
    dim = _arg(node, 1, "dim")
    if dim is None:
        dims = [d for d in range(len(s)) if s[d] == 1]
    else:
        dims = [a.norm_dim(d, len(s)) for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        dims = [d for d in dims if s[d] == 1]
    return [lay[d] for d in range(len(s)) if d not in dims]


# ---- reductions, pooling, concatenation, indexing ------------------------------------------------
def reduce_dims(a: Propagation, node: fx.Node, x: fx.Node, dims: Any, keepdim: bool, name: str) -> Layout | None:
    lay, s = a.layout_or_fixed(x)
    if dims is None:
        dims = list(range(len(s)))
    elif isinstance(dims, int):
        dims = [dims]
    dims = [a.norm_dim(d, len(s)) for d in dims]
    for d in dims:
        if lay[d] is not None:
            a.block_layout(
                [lay[d]],
                "ReductionOverGrownDimError",
                f"{name} over dim {d} at {source_of(node)} reduces over the units, so every new unit would change it",
            )
    if a.shape(node) is None:
        return None
    if keepdim:
        return [None if d in dims else lay[d] for d in range(len(s))]
    return [lay[d] for d in range(len(s)) if d not in dims]


def reduce(a: Propagation, node: fx.Node) -> Layout | None:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return reduce_dims(a, node, node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), name)


def softmax_dim(a: Propagation, node: fx.Node, x: fx.Node, dim: int | None) -> Layout:
    lay, s = a.layout_or_fixed(x)
    d = a.norm_dim(dim if dim is not None else -1, len(s))
    if lay[d] is not None:
        a.block_layout(
            [lay[d]],
            "ReductionOverGrownDimError",
            f"softmax over dim {d} at {source_of(node)} normalises over the units",
        )
    return list(lay)


def softmax(a: Propagation, node: fx.Node) -> Layout:
    return softmax_dim(a, node, node.args[0], _arg(node, 1, "dim"))


def channel_pass(a: Propagation, node: fx.Node, x: fx.Node | None = None, keep: int = 2) -> Layout | None:
    """Pooling-like ops: batch and channel dims keep their layout, the rest become fixed."""
    x = node.args[0] if x is None else x
    out_s = a.shape(node)
    if out_s is None:
        return None
    lay, s = a.layout_or_fixed(x)
    for d in range(keep, len(s)):
        if lay[d] is not None:
            a.block_layout([lay[d]], "UnsupportedOpError", f"{source_of(node)} pools over a grown dim")
    return lay[:keep] + [None] * (len(out_s) - keep)


def pad(a: Propagation, node: fx.Node) -> Layout | None:
    """F.pad pads the last len(pad)/2 dims: the others keep their layout; padding a grown dim would give
    new units no place, so it blocks (a spatial pad, as in DARTS's factorized reduce, carries channels); a
    dim whose pad is a literal (0, 0) is not padded and keeps its layout."""
    x, widths = node.args[0], _arg(node, 1, "pad", ())
    out_s = a.shape(node)
    if out_s is None:
        return None
    lay = a.layout_or_fixed(x)[0]
    n_pad = len(widths) // 2
    out: Layout = list(lay)
    for d in range(len(out_s) - n_pad, len(out_s)):
        k = 2 * (len(out_s) - 1 - d)  # this dim's (before, after) pair: the last dim's comes first
        if widths[k : k + 2] in ((0, 0), [0, 0]):  # not padded (timm's Swin pads H and W only): units flow
            continue
        if lay[d] is not None:
            a.block_layout([lay[d]], "UnsupportedOpError", f"{source_of(node)} pads a grown dim")
        out[d] = None
    return out


def roll(a: Propagation, node: fx.Node) -> Layout | None:
    """`torch.roll(x, shifts, dims)` shifts positions along `dims` (Swin's cyclic window shift over H and W):
    the other dims keep their layout; rolling a grown dim, or the flattened tensor (no dims), blocks it."""
    x, dims = node.args[0], _arg(node, 2, "dims", None)
    if a.shape(node) is None:
        return None
    lay, s = a.layout_or_fixed(x)
    dims = [dims] if isinstance(dims, int) else dims
    rolled = range(len(s)) if not dims else [a.norm_dim(d, len(s)) for d in dims]
    for d in rolled:
        if lay[d] is not None:
            a.block_layout([lay[d]], "UnsupportedOpError", f"{source_of(node)} rolls a grown dim")
    return list(lay)


def cat(a: Propagation, node: fx.Node) -> Layout:
    out_s = a.shape(node)
    n = len(out_s)
    # torch.cat skips 1-d empty tensors of any rank (a key/value cache starts as `torch.tensor([])`)
    tensors = [t for t in node.args[0] if not (n != 1 and a.shape(t) == (0,))]
    if any(a.shape(t) is None or len(a.shape(t)) != n for t in tensors):
        for t in a.tensor_args(node):
            a.block_layout(a.env.get(t), "UnsupportedOpError", f"{source_of(node)} concatenates tensors of other ranks")
        return a.fixed(n)
    dim = a.norm_dim(_arg(node, 1, "dim", 0), n)
    segs: list[Seg] = []
    for t in tensors:
        lay = a.layout_or_fixed(t)[0]
        segs += list(lay[dim]) if lay[dim] is not None else [(None, a.shape(t)[dim])]
    out: Layout = []
    for d in range(n):
        if d == dim:
            out.append(tuple(segs) if any(g is not None for g, _ in segs) else None)
        else:
            contributions = [(a.layout_or_fixed(t)[0][d], t, d) for t in tensors]
            out.append(unify(a, node, contributions, "add"))
    return out


def getitem(a: Propagation, node: fx.Node) -> Any:
    x, idx = node.args[0], node.args[1]
    if isinstance(a.env.get(x), tuple):
        return a.env[x][idx]
    s = a.shape(x)
    if s is None:  # an element of an opaque module's tuple output: fixed
        out_s = a.shape(node)
        return a.fixed(len(out_s)) if out_s is not None else None
    lay = a.layout_or_fixed(x)[0]
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
                a.block_layout([lay[d]], "UnsupportedOpError", f"{source_of(node)} indexes into a grown dim")
            if isinstance(it, slice):
                out.append(None)
            d += 1
        else:
            return a.block_unknown(node, "tensor indexing")
    out += lay[d:]
    return out


def chunk(a: Propagation, node: fx.Node) -> Any:
    """`x.chunk(n, dim)` / `x.split(size, dim)` into equal parts. Along a grown dim the producer's units become one
    group per part (`cut`); dims not cut pass through every part."""
    x = node.args[0]
    metas = node.meta.get("tensor_meta")
    lay, s = a.layout_or_fixed(x)
    if not isinstance(metas, (tuple, list)) or s is None:
        return a.block_unknown(node, "a split into parts")
    dim = _arg(node, 2, "dim", 0) % len(s)
    sizes = {tuple(m.shape)[dim] for m in metas}
    why = None
    if node.target in (torch.split, "split") and not isinstance(_arg(node, 1, "split_size"), fx.Node):
        why = "into parts of a fixed size (x.chunk(n), or a size computed from the shape, follows growth)"
    elif len(sizes) != 1:
        why = "into unequal parts"
    return tuple(cut(a, node, x, dim, len(metas), why))


def glu(a: Propagation, node: fx.Node, dim: int | None = None) -> Any:
    """`F.glu(x, dim)` / nn.GLU (`dim` given): the first half times the sigmoid of the second, one group of row
    pairs (`cut`)."""
    x = node.args[0]
    _, s = a.layout_or_fixed(x)
    if s is None:
        return a.block_unknown(node, "glu")
    dim = (_arg(node, 1, "dim", -1) if dim is None else dim) % len(s)
    value, gate = cut(a, node, x, dim, 2)
    return [unify(a, node, [(v, x, d), (g, x, d)], "mul") for d, (v, g) in enumerate(zip(value, gate))]


def cut(a: Propagation, node: fx.Node, x: fx.Node, dim: int, n: int, why: str | None = None) -> list[Layout]:
    """The layouts of `x` cut into `n` equal parts along `dim`. A grown dim can be cut only where it is a layer's
    fresh output (one module's rows, read by the cut alone): its units become one group per part, part k's unit j
    at row k*W/n + j of the producer, which then holds the parts side by side (a GLU's value and gate halves,
    multiplied back into one group whose unit is a pair of rows). Otherwise (or given `why`) the dim is blocked."""
    lay, _ = a.layout_or_fixed(x)

    def with_dim(dl: Any) -> Layout:
        return [*lay[:dim], dl, *lay[dim + 1 :]]

    if lay[dim] is None:
        return [with_dim(None) for _ in range(n)]
    if why is None and (len(lay[dim]) != 1 or lay[dim][0][0] is None):
        why = "across several groups"
    elif why is None:
        g, inner = a.find(lay[dim][0][0]), lay[dim][0][1]
        members = a.members[g]
        readers = [u for u in x.users if u is not node and a.shape(u) is not None]  # not `x.shape[-1]`
        if (a.widths[g] % n or readers or not members or len({m.module for m in members}) != 1
                or any(m.role != "producer" or m.per != 1 for m in members)):
            why = "through units other layers already share (only a layer's own output, read by the split alone)"
    if why is not None:
        a.block_layout([lay[dim]], "UnsupportedOpError", f"{source_of(node)} splits a grown dim {why}")
        return [with_dim(None) for _ in range(n)]
    width = a.widths[g] // n
    groups = [g] + [a.new_group(width, f"{a.names[g]}.part{k}") for k in range(1, n)]
    for k, h in enumerate(groups):
        a.members[h] = [dataclasses.replace(m, offset=m.offset + k * width * m.inner) for m in members]
        a.producers[h] = list(a.producers[g])
    a.widths[g] = width
    a.channel_dims[g] = []  # the producer's output holds every part now
    for h in groups:  # a unit is now a function of several rows: a norm's completion cannot make it the mean
        a.constraints[h].append(Constraint("parts", members[0].module))
    a.env[x] = with_dim(tuple((h, inner) for h in groups))
    return [with_dim(((h, inner),)) for h in groups]


# ---- the tables ------------------------------------------------------------------------------------
for _f in ADDITIVE_FUNCS | PER_ELEMENT_FUNCS:
    register_function_rule(_f, lambda a, node: elementwise(a, node, "add"))
for _f in MULTIPLICATIVE_FUNCS:
    register_function_rule(_f, lambda a, node: elementwise(a, node, "mul"))
for _m in ADDITIVE_METHODS | PER_ELEMENT_METHODS:
    register_function_rule(_m, lambda a, node: elementwise(a, node, "add"))
for _m in MULTIPLICATIVE_METHODS:
    register_function_rule(_m, lambda a, node: elementwise(a, node, "mul"))
for _f in (
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
):
    register_function_rule(_f, lambda a, node: channel_pass(a, node))
for _f in (torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.std, torch.var):
    register_function_rule(_f, reduce)
for _m in ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm", "argmax"):
    register_function_rule(_m, reduce)
for _t in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"):
    register_function_rule(_t, softmax)
for _t in (torch.flatten, "flatten"):
    register_function_rule(_t, flatten)
for _t in (torch.reshape, "view", "reshape"):
    register_function_rule(_t, reshape)
for _t in (torch.transpose, torch.swapaxes, "transpose"):
    register_function_rule(_t, transpose)
for _t in (torch.permute, "permute"):
    register_function_rule(_t, permute)
for _t in (torch.unsqueeze, "unsqueeze"):
    register_function_rule(_t, unsqueeze)
for _t in (torch.squeeze, "squeeze"):
    register_function_rule(_t, squeeze)
register_function_rule(torch.cat, cat)
for _t in (torch.roll, "roll"):
    register_function_rule(_t, roll)
register_function_rule(F.pad, pad)
register_function_rule(torch.concat, cat)
register_function_rule(operator.getitem, getitem)
for _t in (torch.chunk, "chunk", torch.split, "split"):
    register_function_rule(_t, chunk)
register_function_rule(F.glu, glu)
register_constraint("parts", lambda c, g, s, n, ap: None)  # any change; a norm over such units says why not
