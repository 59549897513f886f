"""Normalised residual streams: the LayerNorm and RMSNorm rules and the exact completion of a group they normalise.

A group read through a LayerNorm or RMSNorm (a transformer's residual stream) grows exactly when every writer puts
the mean of its old units (LayerNorm) or zero (RMSNorm) into the new ones and each norm's gains and epsilon are
rescaled (`complete_norm_stream`); the constraints registered at the bottom tell the engine so, and
`norm_stream_reason` says where that cannot hold (a post-norm block, a norm over more than the group).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ApproximationRequiredError
from . import shapeops
from .builtin_rules import input_layout, norm_members
from .graph import Constraint, Member, member_key
from .rules import GrownGroup, LayerRule, PassThroughRule, is_post_norm, register_constraint, register_rule, rule_for
from .trace import source_of

if TYPE_CHECKING:
    from .propagate import Propagation


class LayerNormRule(LayerRule):
    """nn.LayerNorm over the last dim: its gain and bias are norm members, and a `layernorm` constraint says
    how the group grows exactly (`complete_norm_stream`)."""

    attrs = ("normalized_shape", "eps")
    constraint = "layernorm"

    def kept_whole(self, m: nn.Module) -> bool:
        """A subclass of nn.LayerNorm with a forward of its own (timm's channels-first LayerNorm2d permutes
        around `F.layer_norm`) is traced into: its `F.layer_norm` call carries the rule, on the right dim."""
        overridden = isinstance(m, nn.LayerNorm) and type(m).forward is not nn.LayerNorm.forward
        return self.leaf and not overridden

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        lay, _ = input_layout(a, node)
        shape = getattr(m, "normalized_shape", None)
        k = len(shape) if shape is not None else 1
        normed = lay[len(lay) - k :]
        if any(d is not None for d in normed):
            if k != 1:
                why = f"{type(m).__name__} {name!r} normalises several dims including a grown one"
                a.block_layout(normed, "UnsupportedOpError", why)
            else:
                norm_members(a, normed[0], m, name, False)
                for g in a.groups_in([normed[0]]):
                    a.constraints[g].append(Constraint(self.constraint, name))
                flag_nonlinear_writes(a, node.args[0] if node.args else None, a.groups_in([normed[0]]), name)
        return list(lay)

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        ref = m.weight if m.weight is not None else getattr(m, "bias", None)
        if ref is not None and hasattr(m, "normalized_shape"):
            m.normalized_shape = (*tuple(m.normalized_shape)[:-1], ref.shape[-1])

    def check(self, m: nn.Module) -> bool:
        return m.weight is None or not hasattr(m, "normalized_shape") or (
            tuple(m.weight.shape) == tuple(m.normalized_shape)
        )

    def norm_eps(self, m: nn.Module) -> tuple[str, float] | None:
        return ("eps", float(m.eps))


class RMSNormRule(LayerNormRule):
    """nn.RMSNorm (and layers computing `weight * x / sqrt(mean(x^2) + eps)` with their epsilon in attribute
    `eps_attr`, e.g. transformers' LlamaRMSNorm): kept whole, its gain a norm member, constraint `rmsnorm`.
    An epsilon of None (nn.RMSNorm's default) is the dtype's machine epsilon, set explicitly on growth.
    `gain_offset`: the norm multiplies by `gain_offset + weight` (Gemma's `1 + weight`); the completion rescales
    that sum."""

    constraint = "rmsnorm"

    def __init__(self, eps_attr: str = "eps", gain_offset: float = 0.0) -> None:
        self.eps_attr = eps_attr
        self.gain_offset = gain_offset
        self.attrs = ("normalized_shape", eps_attr)

    def norm_eps(self, m: nn.Module) -> tuple[str, float] | None:
        eps = getattr(m, self.eps_attr, None)
        if eps is None:
            ref = getattr(m, "weight", None)
            eps = torch.finfo(ref.dtype if ref is not None else torch.get_default_dtype()).eps
        return (self.eps_attr, float(eps))


def _activation_at(a: Propagation, n: fx.Node) -> Any:
    """The registered element-wise activation node `n` computes (module, function or tensor method), or None."""
    from .activations import ACTIVATIONS, activation_of, activation_of_function

    if n.op == "call_module":
        return activation_of(a.modules.get(str(n.target)))
    if n.op == "call_function":
        return activation_of_function(n.target)
    if n.op == "call_method":
        return next((act for act in ACTIVATIONS.values() if str(n.target) in act.methods), None)
    return None


def flag_nonlinear_writes(a: Propagation, start: Any, groups: set[int], norm: str) -> None:
    """Walk back from a norm's input `start` along the raw values of `groups` to their writers (modules other
    than pass-throughs stop the walk: their new rows are completed); an element-wise activation on the way
    (`z + gelu(W z)`, a stream that starts as `relu(embedding)`) maps the mean of the old units to something else
    than the mean of their images, so the group gets a `nonlinear` constraint and new units are refused with
    that reason (`nonlinear_reason`); duplicating every unit stays exact."""
    roots = {a.find(g) for g in groups}
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if not {a.find(g) for g in a.groups_in(a.env.get(n))} & roots:
            continue
        act = _activation_at(a, n)
        if act is not None:
            for g in roots:
                a.constraints[g].append(Constraint("nonlinear", f"{act.name} at {source_of(n)} (before {norm})"))
            return
        if n.op == "call_module" and not isinstance(rule_for(a.modules.get(str(n.target))), PassThroughRule):
            continue  # a writer (Linear, Conv, Embedding, another norm): the completion decides its new rows
        stack.extend(n.all_input_nodes)


def when_normalised(why: Callable[[list[Constraint], Any, Constraint], str]) -> Any:
    """A constraint's completion reason that holds only where a norm completes the group (`why(constraints, group,
    norm)`); elsewhere new units are free, any value being exact there."""

    def reason(constraints: list[Constraint], g: Any, model: nn.Module) -> str | None:
        norms = [c for c in g.constraints if c.kind in ("layernorm", "rmsnorm")]
        return why(constraints, g, norms[0]) if norms else None

    return reason


# an activation on a normalised group's raw values (`flag_nonlinear_writes`)
nonlinear_reason = when_normalised(
    lambda cs, g, norm: (
        f"group {g.name!r} is normalised by {norm.module!r}, and an activation acts on its raw units "
        f"({cs[0].module}): a new unit that is the mean of the old ones before it is not their mean after it, so no "
        "completion makes new units exact (duplicate every unit, or pass approximate=True)"
    )
)


def _owned(module: str, owners: tuple[str, ...]) -> bool:
    """Whether `module` is one of `owners` or inside one (an attention's projections and tables: their new rows feed
    no norm, the attention's own completion or zero output columns make them exact)."""
    return any(module == o or module.startswith(o + ".") for o in owners)


def _norm_splits_check(what: str) -> Any:
    def check(c: Constraint, group: Any, split_units: Any, new_count: int, approximate: bool) -> None:
        """New units are made exact by the completion; a split must duplicate every unit exactly once (a twin
        of only some units moves the mean and the mean square of the units)."""
        if approximate or not split_units or sorted(split_units) == list(range(group.width)):
            return
        raise ApproximationRequiredError(
            f"group {group.name!r} is normalised by {what} {c.module!r}: duplicating only some of its units "
            "moves the norm's statistics; split every unit exactly once, add new units (made exact), or pass "
            "approximate=True"
        )

    return check


def _post_norm_block(model: nn.Module, module: str) -> str | None:
    """The enclosing block (by its rule's `post_norm`) that normalises after its residual add, if any."""
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:i])
        try:
            owner = model.get_submodule(name) if name else model
        except AttributeError:
            continue
        if is_post_norm(owner):
            return name
    return None


def mean_slice(old: torch.Tensor, dim: int) -> torch.Tensor:
    """A LayerNorm'd group's new unit: the mean of the old units (the norm's mean is unchanged)."""
    return old.mean(dim, keepdim=True)


def zero_slice(old: torch.Tensor, dim: int) -> torch.Tensor:
    """An RMSNorm'd group's new unit: zero."""
    return torch.zeros_like(old.narrow(dim, 0, 1))


def norm_stream_reason(what: str, centre: bool) -> Any:
    """Why a LayerNorm'd (`centre`) or RMSNorm'd group's new units cannot be completed exactly in a model."""

    def reason(constraints: list[Constraint], g: Any, model: nn.Module) -> str | None:
        parts = [c for c in g.constraints if c.kind == "parts"]
        if parts:
            return (
                f"group {g.name!r} is normalised by {what} {constraints[0].module!r}, and each of its units combines "
                f"several rows of {parts[0].module!r} (a GLU's value and gate): no new rows make a new unit the mean "
                "of the old ones; duplicate every unit, or pass approximate=True"
            )
        for c in constraints:
            block = _post_norm_block(model, c.module)
            if block is not None:
                return (
                    f"group {g.name!r}: {what} {c.module!r} normalises after the residual add of post-norm block "
                    f"{block!r}, so its output is the stream; a new unit there would have to equal the mean of "
                    "the normalised units, which a per-unit gain and bias cannot produce (use a pre-norm block, "
                    "or pass approximate=True)"
                )
            gains = [m for m in g.members if m.module == c.module and m.kind == "norm_weight"]
            try:
                mod = model.get_submodule(c.module)
            except AttributeError:  # a functional norm whose gain is not a module's parameter
                mod = None
            rule = rule_for(mod) if mod is not None else None
            if not gains or rule is None or rule.norm_eps(mod) is None:
                return (
                    f"group {g.name!r}: {what} {c.module!r} has no gain or no epsilon a rule can rescale, so new "
                    "units change what it computes (give it elementwise_affine=True, or pass approximate=True)"
                )
            owner, _, attr = gains[0].tensor.rpartition(".")
            size = getattr(model.get_submodule(owner) if owner else model, attr).shape[gains[0].dim]
            if size == g.width * len(gains) * gains[0].inner > g.width * gains[0].inner and all(
                m.inner == gains[0].inner for m in gains
            ):
                return (
                    f"group {g.name!r}: {what} {c.module!r} normalises its {g.width} units {len(gains)} times over "
                    "(positions merged into channels, as in a patch merging): new units at one copy's mean move "
                    "the statistics of all; duplicate every unit once (exact), or pass approximate=True"
                )
            inner = gains[0].inner  # positions per unit; every writer must write whole units of them
            # an attention whose head dims grow with the stream (nn.MultiheadAttention) writes its q/k/v rows one
            # dim per head: the head_dim completion makes those exact, not this one
            heads = tuple(c.module for c in g.constraints if c.kind in ("head_dim", "blocks"))
            writers = [m for m in g.members if (m.role == "producer" or (m.role, m.kind) == ("elementwise", "additive"))
                       and not _owned(m.module, heads)]
            if size != g.width * inner or gains[0].offset != 0 or any(m.inner != inner for m in writers):
                return (
                    f"group {g.name!r}: {what} {c.module!r} normalises {size} units, more than this group's "
                    f"{g.width}; new units would have to follow the other groups too (pass approximate=True)"
                )
        if centre:
            scaled = layer_scales(g, model)
            tied = tuple(c.module for c in g.constraints if c.kind in ("head_dim", "blocks"))  # attention inside
            bad = [
                m.tensor
                for m in g.members
                if (m.role == "elementwise" and m.kind != "additive" and m not in scaled.values())
                or m.role == "passthrough"
                or (m.role in ("producer", "elementwise") and m.per > 1 and not _owned(m.module, tied))
            ]
            if bad:
                return (
                    f"group {g.name!r} is normalised by {what}: new units must be the mean of the old ones, which "
                    f"does not pass through {bad[0]!r} (a per-unit multiplier, filter or block entry); pass "
                    "approximate=True"
                )
        return None

    return reason


def layer_scales(g: Any, model: nn.Module | None = None) -> dict[str, Member]:
    """Per producer module, the per-unit multiplier right after it (LayerScale's gamma on a branch's projection,
    `Member.scales`): a vector over the units, one entry each. The completion weights that producer's mean by it."""
    producers = {m.module: m.inner for m in g.members if m.role == "producer"}
    out: dict[str, Member] = {}
    for m in g.members:
        if m.role != "elementwise" or m.kind != "multiplicative" or m.scales not in producers or m.per != 1:
            continue
        if m.inner != producers[m.scales] or m.scales in out:  # one entry per position its producer writes
            continue
        if model is not None:
            owner, _, attr = m.tensor.rpartition(".")
            t = getattr(model.get_submodule(owner) if owner else model, attr)
            if t.numel() != t.shape[m.dim]:
                continue
        out[m.scales] = m
    return out


def complete_norm_stream(what: str, centre: bool) -> Any:
    """The completion of a group normalised by LayerNorm (`centre=True`) or RMSNorm, adding n units to d.

    Every writer of the group (producer slices, added parameters such as a position embedding) writes the mean
    of its old slices into the new units (LayerNorm; sums of writers stay the mean, so each norm's mean is
    unchanged and its variance shrinks by d/(d+n)) or zero (RMSNorm; the mean square shrinks by d/(d+n)).
    Incoming values a plan gives for a producer (`NewUnits.incoming`, Firefly's trained rows) are added to
    that: they move the new units off the mean, a change of function that `Plan.scaled` scales like any other.
    A writer multiplied per unit right after it (LayerScale's gamma, `Member.scales`) writes the mean of its old
    slices times their multipliers, and its new multipliers are 1: the product is the mean.
    Each norm's old gains are multiplied by sqrt(d/(d+n)), its epsilon by d/(d+n), its new biases are zero:
    it computes exactly what it did on the old units and exact zeros on the new ones, so the readers of the
    normalised units may have any new input columns. Readers of the raw units take the plan's outgoing
    weights (zero by default, scaled by the plan's amplitude) as for any new unit. Refused (`norm_stream_reason`):
    a post-norm block (the norm's output is the stream, and a per-unit gain cannot make its new units the
    mean), a norm without a gain or over more than this group's units, and under LayerNorm any other
    multiplicative or per-channel (depthwise) member, for which the mean does not pass through."""

    def complete(constraints: list[Constraint], grown: GrownGroup) -> None:
        ch = grown.change
        g = ch.group
        n_new = ch.new.count if ch.new is not None else 0
        if n_new == 0:
            return  # whole duplication (the check allows no other split): statistics unchanged
        d_old = g.width + len(ch.splits)
        factor = d_old / (d_old + n_new)
        norms = []
        for c in constraints:
            mod = grown.module(c.module)
            norms.append((c, mod, rule_for(mod).norm_eps(mod)))
        offsets = set(ch.new.incoming) if ch.new is not None else set()  # a plan's own incoming values
        scales = layer_scales(g) if centre else {}
        with torch.no_grad():
            for gamma in scales.values():
                t = grown.tensor(gamma.tensor)
                t.index_fill_(gamma.dim, grown.positions(gamma, "new").flatten().to(t.device), 1.0)
            for m in g.members:
                if m.role != "producer" and not (m.role == "elementwise" and m.kind == "additive"):
                    continue
                t = grown.tensor(m.tensor)
                new = grown.positions(m, "new").to(t.device)
                old = torch.cat([grown.positions(m, "old"), grown.positions(m, "twin")]).to(t.device)
                # the norm's mean is over every position of its dim, so the new ones take the mean of all old
                # positions (a unit wider than one position: a flattened channel, or one dim in every head)
                slices = t.index_select(m.dim, old.flatten())
                if m.role == "producer" and m.module in scales:
                    gamma = scales[m.module]
                    g_t = grown.tensor(gamma.tensor)
                    g_old = torch.cat([grown.positions(gamma, "old"), grown.positions(gamma, "twin")]).flatten()
                    shape = [1] * slices.dim()
                    shape[m.dim] = -1
                    slices = slices * g_t.flatten()[g_old.to(g_t.device)].to(slices.dtype).view(shape)
                mean = (mean_slice if centre else zero_slice)(slices, m.dim)
                shape = list(t.shape)
                shape[m.dim] = new.shape[0]
                given = m.tensor in offsets or member_key(m) in offsets
                for r in range(m.inner):
                    value = mean.expand(shape)
                    if m.role == "producer" and given:  # a plan's values move the new unit off the mean
                        value = value + t.index_select(m.dim, new[:, r])
                    t.index_copy_(m.dim, new[:, r], value)
            for c, mod, (attr, eps) in norms:
                for m in g.members:
                    if m.module != c.module or m.role != "norm":
                        continue
                    t = grown.tensor(m.tensor)
                    if m.kind == "norm_weight":  # the gain is offset + weight (Gemma: 1 + weight)
                        offset = getattr(rule_for(mod), "gain_offset", 0.0)
                        keep = torch.cat([grown.positions(m, "old"), grown.positions(m, "twin")]).flatten().to(t.device)
                        gains = (t.index_select(m.dim, keep) + offset) * math.sqrt(factor)
                        t.index_copy_(m.dim, keep, gains - offset)
                        if offset:  # a new unit's gain 1, as a fresh norm's
                            t.index_fill_(m.dim, grown.positions(m, "new").flatten().to(t.device), 1.0 - offset)
                    elif m.kind == "norm_bias":
                        t.index_fill_(m.dim, grown.positions(m, "new").flatten().to(t.device), 0)
                grown.set_attr(mod, attr, eps * factor)

    return complete


# a normalised stream whose units also pass along another dim of a Linear (MLP-Mixer's token-mixing MLP maps each
# channel's tokens): a new channel, exactly zero after the norm, comes back into the stream as that MLP's output on
# zeros, not as the mean of the old channels (LayerNorm) nor zero (RMSNorm with biases), and no completion of the
# writers' slices reaches it
across_reason = when_normalised(
    lambda cs, g, norm: (
        f"group {g.name!r} is normalised by {norm.module!r}, and its units also pass along another dim of "
        f"Linear {cs[0].module!r} (token mixing): a new unit, zero after the norm, comes back into the "
        "stream as that layer's output on zeros, not the mean of the old units, so no completion makes it exact "
        "(grow the MLPs, duplicate every unit, or pass approximate=True)"
    )
)


def layer_norm_function(a: Propagation, node: fx.Node) -> Any:
    """`F.layer_norm(x, shape, weight, bias)` as called inside a module (ConvNeXt's LayerNorm2d)."""
    lay, s = a.layout_or_fixed(node.args[0])
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    normed = lay[len(lay) - k :]
    if any(d is not None for d in normed):
        if k != 1:
            a.block_layout(normed, "UnsupportedOpError", f"layer_norm at {source_of(node)} normalises several dims")
            return list(lay)
        owner = ""
        for i, key, kind in ((2, "weight", "norm_weight"), (3, "bias", "norm_bias")):
            p = node.args[i] if len(node.args) > i else node.kwargs.get(key)
            if isinstance(p, fx.Node) and p.op == "get_attr":
                owner = str(p.target).rpartition(".")[0]
                a.add_members(normed[0], str(p.target), 0, "norm", kind, owner)
            elif p is not None:
                a.block_layout(normed, "UnsupportedOpError", f"layer_norm at {source_of(node)} has a computed {key}")
        for g in a.groups_in([normed[0]]):
            a.constraints[g].append(Constraint("layernorm", owner or node.name))
        flag_nonlinear_writes(a, node.args[0], a.groups_in([normed[0]]), owner or node.name)
    return list(lay)



register_rule(nn.LayerNorm, LayerNormRule())
shapeops.register_function_rule(F.layer_norm, layer_norm_function)
register_constraint(
    "across",
    lambda c, g, s, n, ap: None,  # new units are free there unless a norm completes the group (`across_reason`)
    reason=across_reason,
)
register_constraint(
    "nonlinear",
    lambda c, g, s, n, ap: None,  # new units are free there unless a norm completes the group (`nonlinear_reason`)
    reason=nonlinear_reason,
)
register_constraint(
    "layernorm",
    _norm_splits_check("LayerNorm"),
    complete_norm_stream("LayerNorm", centre=True),
    completes=("producer", "elementwise"),
    whole_splits=True,
    new_slices=mean_slice,
    reason=norm_stream_reason("LayerNorm", centre=True),
)
register_constraint(
    "rmsnorm",
    _norm_splits_check("RMSNorm"),
    complete_norm_stream("RMSNorm", centre=False),
    completes=("producer", "elementwise"),
    whole_splits=True,
    new_slices=zero_slice,
    reason=norm_stream_reason("RMSNorm", centre=False),
)
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, RMSNormRule())

