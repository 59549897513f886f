"""Rules for torch's own attention layers: nn.MultiheadAttention and the nn.TransformerEncoderLayer that holds it.

nn.MultiheadAttention ties its input, its heads (num_heads x head_dim) and its output to one width, `embed_dim`, so
both of its expansions are changes of the stream it reads:

* whole heads: the stream's own group, grown by blocks of head_dim (new q/k/v rows appended as new heads);
* head dims (Gesmundo & Maile's key/query and value expansions): `<attention>.head_dim`, one unit = one new dim in
  every head of every nn.MultiheadAttention on that stream plus num_heads new stream channels. It is built once
  the stream is known (`Propagation.defer`): every member of the stream, a unit now `num_heads` channels wide,
  and each attention's projections cut per head (`heads.head_dim_members`). The stream's norm completion makes the
  new channels exact (`norm_stream`), then the head_dim completion scales the query rows and zeros the new key
  rows (`heads.complete_head_dim`), so the change is exact wherever widening the stream is.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .graph import Constraint, Member
from .heads import Projection, follow_head_dim, head_dim_members
from .rules import LayerRule, register_rule
from .shapeops import param_source

_HEAD_DIM = "stream head_dim"
_STREAM_CONSTRAINTS = ("layernorm", "rmsnorm")  # completions the head_dim completion runs after

if TYPE_CHECKING:
    from .propagate import Propagation


class MultiheadAttentionRule(LayerRule):
    """nn.MultiheadAttention ties its input, its heads (num_heads x head_dim) and its output to one
    width, `embed_dim`: growing that group adds whole heads (new q/k/v rows, out-projection columns,
    and the same number of new embedding channels). New heads whose out-projection columns are zero,
    or copies of whole heads with halved out-projection columns, leave the output unchanged."""

    attrs = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim")
    attention = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.MultiheadAttention, name: str) -> Any:
        out_shapes = a.output_shapes(node)
        multi = a.has_multiple_outputs(node)
        outs: list[Any] = [a.fixed(len(s)) if s is not None else None for s in out_shapes]
        inputs = [x for x in (node.args[:3] or ()) if isinstance(x, fx.Node)]
        inputs += [node.kwargs[k] for k in ("query", "key", "value") if isinstance(node.kwargs.get(k), fx.Node)]
        head_dim = a.new_group(m.head_dim, f"{name}.head_dim")
        # an input that is a parameter seen through expand/repeat (SigLIP's pooling probe as the query) follows the
        # stream as an added member; any value of its new entries is exact, the projections' new columns are zero
        probes = {x: param_source(a, x, len(a.shape(x)) - 1) for x in inputs if m._qkv_same_embed_dim
                  and a.shape(x) is not None and a.layout_or_fixed(x)[0][-1] is None}
        probes = {x: p for x, p in probes.items() if p is not None}
        inputs = [x for x in inputs if x not in probes]
        layouts = [a.layout_or_fixed(x)[0] for x in inputs]
        grown = [lay[-1] for lay in layouts if lay[-1] is not None]
        for lay in layouts:  # only the embedding dim may carry units
            a.block_layout(
                lay[:-1], "UnsupportedOpError", f"nn.MultiheadAttention {name!r} mixes tokens of a grown dim"
            )
        separate = not m._qkv_same_embed_dim  # kdim/vdim differ: q/k/v_proj_weight, read by their own inputs
        reason = None
        if m.bias_k is not None:
            reason = "has bias_k/bias_v (register a rule for it)"
        elif separate and len(layouts) == 3 and layouts[0][-1] is not None:
            grown = [layouts[0][-1]]  # the query's stream; key and value are read as other groups
        elif grown and (len(grown) != len(layouts) or any(len(dl) != 1 for dl in grown)):
            reason = "reads a fixed-width or concatenated input"
        if reason is None and grown and len(grown[0]) != 1:
            reason = "reads a concatenated input"
        if reason is not None or not grown:
            if reason is not None:
                a.block_layout(grown, "FrozenGroupError", f"nn.MultiheadAttention {name!r} {reason}")
            a.block(head_dim, "FrozenGroupError", f"nn.MultiheadAttention {name!r} grows head_dim only with the "
                    f"stream it reads (embed_dim = num_heads x head_dim), and {reason or 'that stream does not grow'}")
            return tuple(outs) if multi else outs[0]
        g = grown[0][0][0]
        for dl in grown[1:]:
            g = a.union(g, dl[0][0], node)
        g = a.find(g)
        dl = ((g, 1),)
        e = m.embed_dim
        rows = _row_tensors(m, name)
        if separate:  # each projection reads its own input
            for (tensor, _), lay in zip(rows, layouts):
                a.add_members(lay[-1], tensor, 1, "consumer", "weight", name)
        else:
            a.add_members(dl, f"{name}.in_proj_weight", 1, "consumer", "weight", name)
        for tensor, offset in rows:  # q, k, v rows: three blocks of embed_dim
            a.members[g].append(Member(tensor, 0, "producer", "weight", name, offset))
        if m.in_proj_bias is not None:
            for k in range(3):
                a.members[g].append(Member(f"{name}.in_proj_bias", 0, "producer", "bias", name, k * e))
        out = f"{name}.out_proj"
        a.members[g].append(Member(f"{out}.weight", 1, "consumer", "weight", out))
        a.members[g].append(Member(f"{out}.weight", 0, "producer", "weight", out))
        if m.out_proj.bias is not None:
            a.members[g].append(Member(f"{out}.bias", 0, "producer", "bias", out))
        a.constraints[g].append(Constraint("blocks", name, m.head_dim))
        for tensor, dim in probes.values():
            a.members[g].append(Member(tensor, dim, "elementwise", "additive", tensor.rpartition(".")[0]))
        a.members[head_dim].extend(_head_dim_members(m, name))
        a.constraints[head_dim].append(Constraint("head_dim", name))
        internal = frozenset({(t, 0) for t, _ in rows} | {(f"{name}.in_proj_bias", 0), (f"{out}.weight", 1)})
        defer_stream_head_dim(a, StreamHeadDim(head_dim, g, name, m.num_heads, node, internal))
        outs[0][-1] = dl
        return tuple(outs) if multi else outs[0]

    def rederive(self, m: nn.MultiheadAttention, before: dict[str, Any]) -> None:
        m.embed_dim = m.out_proj.weight.shape[0]
        if m._qkv_same_embed_dim:
            m.kdim = m.vdim = m.embed_dim
        else:
            m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
        m.head_dim = before["head_dim"]
        m.num_heads = m.embed_dim // m.head_dim

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return follow_head_dim(self, m, old, new, set_attr)  # the module derives its scale from head_dim itself

    def check(self, m: nn.MultiheadAttention) -> bool:
        e, w = m.embed_dim, m.in_proj_weight
        if w is None:  # separate projections
            shapes = [tuple(t.shape) for t in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
            return m.num_heads * m.head_dim == e and shapes == [(e, e), (e, m.kdim), (e, m.vdim)]
        return m.num_heads * m.head_dim == e and tuple(w.shape) == (3 * e, e)


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())


def _row_tensors(m: nn.MultiheadAttention, name: str) -> list[tuple[str, int]]:
    """(tensor, offset) of the q, k and v rows: three blocks of the packed in_proj_weight, or the separate
    q/k/v_proj_weight when kdim or vdim differ from embed_dim."""
    if m._qkv_same_embed_dim:
        return [(f"{name}.in_proj_weight", k * m.embed_dim) for k in range(3)]
    return [(f"{name}.{p}_proj_weight", 0) for p in "qkv"]


def _head_dim_members(m: nn.MultiheadAttention, name: str) -> list[Member]:
    """The q/k/v rows and biases cut per head (`heads.head_dim_members`) and the output projection's columns."""
    heads, parts = m.num_heads, ("query", "key", "value")
    projections = [Projection(part, tensor, 0, name, heads, offset) for part, (tensor, offset) in
                   zip(parts, _row_tensors(m, name))]
    members = head_dim_members(projections + [Projection("output", f"{name}.out_proj.weight", 1,
                                                          f"{name}.out_proj", heads)], m.head_dim)
    if m.in_proj_bias is not None:  # its own tensor, three blocks: the bias kinds of each part
        kinds = {"query": "query_bias", "key": "key_bias", "weight": "bias"}
        for k, part in enumerate(parts):
            bias = Projection(part, f"{name}.in_proj_bias", 0, name, heads, k * m.embed_dim)
            members += [dataclasses.replace(b, kind=kinds[b.kind]) for b in head_dim_members([bias], m.head_dim)]
    return members


@dataclasses.dataclass(frozen=True)
class StreamHeadDim:
    """What an attention that ties heads x head_dim to its stream records for `defer_stream_head_dim`: its head_dim
    group (segmented projections already in it), the stream's group, its head count, and the (tensor, dim) pairs
    of its own on the stream group that the head_dim group replaces (packed q/k/v rows, output columns, per-head
    tables)."""

    group: int
    stream: int
    module: str
    heads: int
    node: fx.Node
    internal: frozenset[tuple[str, int]]


def defer_stream_head_dim(a: Propagation, note: StreamHeadDim) -> None:
    """Build the head_dim group of an attention whose head size is its stream's width / num_heads once propagation
    is over (module docstring): nn.MultiheadAttention's, torchvision Swin's."""
    a.defer(_HEAD_DIM, _stream_head_dims, note)


def _stream_head_dims(a: Propagation) -> None:
    """After propagation: one head_dim group per stream read by such attentions, or the reason it cannot grow."""
    by_stream: dict[int, list[StreamHeadDim]] = defaultdict(list)
    for note in a.notes[_HEAD_DIM]:
        by_stream[a.find(note.stream)].append(note)
    for s, notes in by_stream.items():
        heads = {n.heads for n in notes}
        group = notes[0].group
        for n in notes[1:]:
            if len(heads) > 1:  # head_dim groups of different widths: each says why on its own
                a.block(n.group, "FrozenGroupError", f"the attentions on its stream have different head counts "
                        f"{sorted(heads)}, so no number of new stream channels is one dim in every head of each")
            else:
                group = a.union(group, n.group, n.node)
        internal = frozenset().union(*(n.internal for n in notes))
        stream = [mem for mem in dict.fromkeys(a.members[s]) if (mem.tensor, mem.dim) not in internal]
        other = [c for c in a.constraints[s] if c.kind not in (*_STREAM_CONSTRAINTS, "blocks")]
        why = None
        if a.blocked[s] is not None:
            why = f"that stream cannot grow: {a.blocked[s][1]}"
        elif len(heads) > 1:
            why = f"the attentions on that stream have different head counts {sorted(heads)}"
        elif any(mem.per != 1 for mem in stream):
            why = "a tensor on that stream holds one entry per block of its units"
        elif other:
            why = f"that stream is constrained by {other[0].kind} {other[0].module!r}, which no head-dim change follows"
        if why is not None:
            a.block(group, "FrozenGroupError", f"attention {notes[0].module!r} grows head_dim only with the stream it "
                    f"reads (its width = num_heads x head_dim), and {why}")
            continue
        per_unit = heads.pop()  # one dim in every head = that many stream channels
        root = a.find(group)
        a.members[root].extend(dataclasses.replace(mem, inner=mem.inner * per_unit) for mem in stream)
        a.constraints[root].extend(c for c in a.constraints[s] if c.kind in _STREAM_CONSTRAINTS)


class TransformerEncoderLayerRule(LayerRule):
    """nn.TransformerEncoderLayer is traced into (its attention and Linear layers carry the rules); post-norm
    (`norm_first=False`) it normalises the stream after the residual add."""

    leaf = False

    def post_norm(self, m: nn.TransformerEncoderLayer) -> bool:
        return not m.norm_first


register_rule(nn.TransformerEncoderLayer, TransformerEncoderLayerRule())
