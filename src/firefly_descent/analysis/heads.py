"""The shared half of the rules that keep an attention module whole and grow it by whole heads or by dims per
head (used by transformers_rules, timm_rules and the library's own attention): it lives apart from the optional
packages so that neither is imported to load the other's rules.

Growing `head_dim` (Gesmundo & Maile's key/query and value expansions, which these modules tie to one size) gives
every head `k` new dims at once: one unit of the group `<attention>.head_dim` is one dim in every head, so each
projection tensor holds one segment per head (`Projection`, `head_dim_members`). The change is exact with new key
rows zero (each head's query·key products are unchanged), new output columns zero, and the query rows scaled by
sqrt(new/old) so that the module's new scale, 1/sqrt(new head_dim), gives the old logits; a split dim halves its
key rows instead (its product is counted twice). The completion below does this; the rule sets the attributes.
The group grows only when asked for by name (`widen`, a grower's `groups=`): it is not a neuron the methods model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from .graph import Constraint, Member
from .rules import GrownGroup, LayerRule, register_constraint, rule_for

if TYPE_CHECKING:
    from .propagate import Propagation


@dataclass(frozen=True)
class Projection:
    """One tensor of an attention's projections as head_dim growth sees it: `heads` blocks of head_dim along `dim`
    from `offset`. `part`: "query" or "key" (rows of the query·key product), "value" (rows whose dims the output
    reads; a gate's rows too), "output" (the columns that read every head's values)."""

    part: str
    weight: str
    dim: int
    module: str
    heads: int
    offset: int = 0
    bias: str | None = None


# part -> (kind of its weight members, kind of its bias members): "key" rows start at zero (engine.tensors'
# default fill), "query" rows are drawn like any incoming weight.
_HEAD_DIM_KINDS = {"query": ("query", "query_bias"), "key": ("key", "key_bias"), "value": ("weight", "bias"),
                   "output": ("weight", "bias")}


def head_dim_members(projections: list[Projection], head_dim: int, unit: int = 1) -> list[Member]:
    """The members of a head_dim group: per projection tensor `unit` segments per head (2 under rotary embeddings:
    a unit is a rotated pair of dims, i and i + head_dim/2), unit j of segment s of head h at `offset + h*head_dim
    + s*head_dim/unit + j`."""
    members = []
    part_width = head_dim // unit
    for p in projections:
        role = "consumer" if p.part == "output" else "producer"
        weight_kind, bias_kind = _HEAD_DIM_KINDS[p.part]
        for h in range(p.heads):
            for s in range(unit):
                at = p.offset + h * head_dim + s * part_width
                members.append(Member(p.weight, p.dim, role, weight_kind, p.module, at))
                if p.bias is not None and role == "producer":
                    members.append(Member(p.bias, 0, role, bias_kind, p.module, at))
    return members


def follow_head_dim(
    rule: LayerRule, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None],
    head_dim_attr: str | None = "head_dim", scale_attrs: tuple[str, ...] = ("scaling", "scale"),
) -> float:
    """Set `m`'s head_dim attribute and the scale attributes that follow it (1/sqrt(head_dim)) through `set_attr`,
    then re-derive the rule's attributes (head counts) from the tensors; returns the factor the query rows take,
    sqrt(new/old)."""
    factor = math.sqrt(new / old)
    if head_dim_attr is not None and hasattr(m, head_dim_attr):
        set_attr(m, head_dim_attr, new)
    for attr in scale_attrs:
        value = getattr(m, attr, None)
        if isinstance(value, float):
            set_attr(m, attr, value / factor)
    for attr in rule.attrs:  # logged before the rule re-derives them with the new head_dim
        if hasattr(m, attr):
            set_attr(m, attr, getattr(m, attr))
    rule.rederive(m, {a: getattr(m, a) for a in rule.attrs if hasattr(m, a)})
    return factor


def _rows(grown: GrownGroup, member: Member, kinds: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([grown.positions(member, k).flatten() for k in kinds])


def _owner_factor(factors: dict[str, float], module: str) -> float:
    """The query factor of the attention that owns `module` (the longest constraint module it lies in)."""
    owners = [name for name in factors if module == name or module.startswith(name + ".")]
    return factors[max(owners, key=len)] if owners else 1.0


def _continue_frequencies(t: torch.Tensor, member: Member, grown: GrownGroup) -> None:
    """New rotary pairs continue the geometric sequence of the old inverse frequencies (slower than every old
    pair); any value is exact, since their key dims start at zero."""
    old = t.index_select(member.dim, grown.positions(member, "old").flatten().to(t.device))
    ratio = (old[-1] / old[-2]).item() if old.numel() > 1 else 0.5
    new_at = grown.positions(member, "new").flatten().to(t.device)
    steps = torch.arange(1, new_at.numel() + 1, dtype=t.dtype, device=t.device)
    t.index_copy_(member.dim, new_at, old[-1] * ratio**steps)


def complete_head_dim(constraints: list[Constraint], grown: GrownGroup) -> None:
    """The engine's completion of a grown head_dim group (module docstring): each attention's rule sets its
    attributes and says its query factor; new key rows are zeroed, a split dim's key rows halved, the query rows
    scaled, and new rotary frequencies continue the old ones. A unit is `channels_per_group` dims per head."""
    change = grown.change
    factors = {}
    for c in constraints:
        m = grown.module(c.module)
        old, new = change.group.width * c.channels_per_group, (change.group.width + change.added) * c.channels_per_group
        factors[c.module] = rule_for(m).set_head_dim(m, old, new, grown.set_attr)  # type: ignore[union-attr]
    copies = Counter(s.unit for s in change.splits)
    with torch.no_grad():
        for member in change.group.members:
            t = grown.tensor(member.tensor)
            factor = _owner_factor(factors, member.module)
            if member.kind in ("query", "query_bias") and factor != 1.0:
                idx = _rows(grown, member, ("old", "twin", "new")).to(t.device)
                t.index_copy_(member.dim, idx, t.index_select(member.dim, idx) * factor)
            elif member.kind in ("key", "key_bias"):
                zero = grown.positions(member, "new").flatten().to(t.device)
                t.index_fill_(member.dim, zero, 0.0)
                for unit, n in copies.items():  # the parent and its n twins share the unit's product
                    twins = [i for i, s in enumerate(change.splits) if s.unit == unit]
                    old_at, twin_at = grown.positions(member, "old")[unit], grown.positions(member, "twin")[twins]
                    idx = torch.cat([old_at, twin_at.flatten()]).to(t.device)
                    t.index_copy_(member.dim, idx, t.index_select(member.dim, idx) / (n + 1))
            elif member.kind == "inv_freq" and change.new is not None and change.new.count:
                _continue_frequencies(t, member, grown)


register_constraint("head_dim", lambda c, g, s, n, ap: None, complete_head_dim, on_request=True, structural=True,
                    after=("layernorm", "rmsnorm"))  # nn.MultiheadAttention's head_dim also widens its stream


def _hidden_states(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("hidden_states")


class _HeadsAttentionRule(LayerRule):
    """Shared half of the attention rules: the stream is read by the q/k/v projections (their input dim), the
    heads are a new group (`heads_members`), and the output projection writes a new group (or the output is the
    heads, read by the next layer); `head_dim` is a group grown on request (`head_dim_projections`), or blocked
    with the reason it does not grow; other tensor inputs (mask, rotary cos/sin) and the token dims must not carry
    units."""

    attention = True  # a block holding it (GPT-2's, Llama's, BERT's, timm's) is copied whole as a depth candidate

    def refuse(self, m: nn.Module) -> str | None:
        """Why this module's heads cannot grow (None: they can)."""
        return None

    def heads_reason(self, m: nn.Module) -> str | None:
        """Why this module's head count cannot grow while the rest of it can (None: it can)."""
        return None

    def head_size(self, m: nn.Module) -> int:
        """The width of one head (`head_dim`)."""
        return m.head_dim

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        """(tensor, dim, module) that read the input stream's units."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        """The head count (units) and the members whose dims follow it."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def output_members(self, m: nn.Module, name: str) -> tuple[str, int, list[Member]] | None:
        """The output group's name, width and producers (None: the output is the heads, side by side)."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        """The projections whose dims per head grow with `<name>.head_dim`, or why head_dim does not grow (then
        a blocked group, so `analyze` and `widen` say so instead of finding no such group)."""
        return "does not grow head_dim (no rule for it)"

    def rotary_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs carrying rotary cos/sin (their last dim: the rotated pairs, twice), whose group the head_dim
        group joins; a module that reads them grows head_dim by pairs (`head_dim_members(..., unit=2)`)."""
        return []

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return follow_head_dim(self, m, old, new, set_attr)

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        x = _hidden_states(node)
        out_shapes = a.output_shapes(node)
        multi = a.has_multiple_outputs(node)
        outs: list[Any] = [a.fixed(len(s)) if s is not None else None for s in out_shapes]
        lay, _ = a.layout_or_fixed(x)
        what = f"{type(m).__name__} {name!r}"
        a.block_layout(lay[:-1], "UnsupportedOpError", f"{what} mixes tokens of a grown dim")
        rotary = self.rotary_inputs(node)
        for other in a.tensor_args(node):
            if other is not x and other not in rotary:
                a.block_layout(a.layout(other), "UnsupportedOpError", f"{what} reads a grown mask or position input")
        why = self.refuse(m)
        if why is not None:
            a.block_layout([lay[-1]], "FrozenGroupError", f"{what} {why}")
            for cos_sin in rotary:  # their pairs would grow under a module that cannot follow
                a.block_layout(a.layout(cos_sin), "FrozenGroupError", f"{what} {why}")
            return tuple(outs) if multi else outs[0]
        for tensor, dim, module in self.stream_readers(m, name):
            a.add_members(lay[-1], tensor, dim, "consumer", "weight", module)
        count, members = self.heads_members(m, name)
        heads = a.new_group(count, f"{name}.heads")
        a.members[heads].extend(members)
        fixed = self.heads_reason(m)
        if fixed is not None:  # the stream and head_dim may still grow
            a.block(heads, "FrozenGroupError", f"{what} {fixed}")
        unit = 2 if rotary else 1
        head_dim = a.new_group(self.head_size(m) // unit, f"{name}.head_dim")
        projections = self.head_dim_projections(a, node, m, name)
        if isinstance(projections, str):
            a.block(head_dim, "FrozenGroupError", f"{what} {projections}")
        else:
            a.members[head_dim].extend(head_dim_members(projections, self.head_size(m), unit))
            a.constraints[head_dim].append(Constraint("head_dim", name, unit))
        for cos_sin in rotary:
            _join_rotary(a, head_dim, cos_sin, what)
        output = self.output_members(m, name)
        if output is None:  # the module outputs its heads side by side: the next layer reads them
            out, inner = heads, self.head_size(m)
        else:
            out_name, width, producers = output
            out, inner = a.new_group(width, out_name), 1
            a.members[out].extend(producers)
        if out_shapes[0] is not None:
            a.channel_dims[out].append((node.name, len(out_shapes[0]) - 1))
            outs[0][-1] = ((out, inner),)
        return tuple(outs) if multi else outs[0]


def _join_rotary(a: Propagation, head_dim: int, cos_sin: fx.Node, what: str) -> None:
    """Join `head_dim` (a group of rotated pairs) with the pairs group of the rotary cos/sin it reads; block it
    when they carry none (no rule for the rotary embedding that made them)."""
    layout = a.layout(cos_sin)
    layouts = list(layout) if isinstance(layout, tuple) else [layout]
    pairs = {a.find(g) for lay in layouts if lay for g, _ in (lay[-1] or ()) if g is not None}
    if len(pairs) != 1 or any(not lay or not lay[-1] or len(lay[-1]) != 2 for lay in layouts):
        a.block(head_dim, "FrozenGroupError", f"{what} does not grow head_dim: its rotary cos/sin carry no group of "
                "rotated pairs (a rotary embedding without a rule, or a rope type that recomputes its frequencies)")
        return
    a.union(head_dim, pairs.pop(), cos_sin)


def fused_projections(m: nn.Module, name: str, qkv: str, weight_dim: int, out: str, out_dim: int,
                      heads: int, width: int) -> list[Projection]:
    """A fused q/k/v projection (rows or columns `[3, heads, head_dim]`, `width` each) and its output projection."""
    bias = f"{name}.{qkv}.bias" if _bias(m.get_submodule(qkv)) else None
    parts = [Projection(part, f"{name}.{qkv}.weight", weight_dim, f"{name}.{qkv}", heads, k * width, bias)
             for k, part in enumerate(("query", "key", "value"))]
    return parts + [Projection("output", f"{name}.{out}.weight", out_dim, f"{name}.{out}", heads)]


def reads_output(a: Propagation, node: fx.Node, module: str) -> bool:
    """Whether the call of `module` reads `node`'s first output directly (through `getitem` only)."""
    frontier = [node]
    for _ in range(3):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op == "call_module" and user.target == module:
                    return True
                if user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem":
                    nxt.append(user)
        frontier = nxt
    return False


def _bias(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None
