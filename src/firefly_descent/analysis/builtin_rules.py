"""The built-in layer rules, registered exactly as a user's rule would be (`register_rule`).

One class per layer type, each with its analysis half (`propagate`) and its engine half (`rederive`,
`check`); constraints a rule records are validated by the check it registers beside it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ApproximationRequiredError
from . import activations as _activations  # noqa: F401 - registers the built-in activations
from . import shapeops
from .graph import Constraint, Member, member_key
from .rules import (
    GrownGroup,
    LayerRule,
    PassThroughRule,
    is_post_norm,
    register_constraint,
    register_rule,
    rule_for,
    unfold_patches,
    whole_blocks,
    with_bias_column,
)
from .trace import source_of

# Channel-preserving modules that are not activations (those are in `activations`): units flow through.
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)

if TYPE_CHECKING:
    from .propagate import Propagation


def _input(a: Propagation, node: fx.Node) -> tuple[Any, tuple[int, ...]]:
    x = next(arg for arg in node.args if isinstance(arg, fx.Node))
    return a.layout_or_fixed(x)


def _producer(a: Propagation, m: nn.Module, name: str, width: int, node: fx.Node, dim: int) -> int:
    g = a.new_group(width, name)
    a.members[g].append(Member(f"{name}.weight", 0, "producer", "weight", name))
    if getattr(m, "bias", None) is not None:
        a.members[g].append(Member(f"{name}.bias", 0, "producer", "bias", name))
    a.channel_dims[g].append((node.name, dim))
    return g


class LinearRule(LayerRule):
    attrs = ("in_features", "out_features")
    linear_map = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Linear, name: str) -> Any:
        lay, s = _input(a, node)
        a.add_members(lay[-1], f"{name}.weight", 1, "consumer", "weight", name)
        for g in a.groups_in(list(lay[:-1])):  # units carried along another dim (MLP-Mixer's token mixing)
            a.constraints[g].append(Constraint("across", name))
        g = _producer(a, m, name, m.out_features, node, len(s) - 1)
        return list(lay[:-1]) + [((g, 1),)]

    def rederive(self, m: nn.Linear, before: dict[str, Any]) -> None:
        m.out_features, m.in_features = m.weight.shape[0], m.weight.shape[1]

    def check(self, m: nn.Linear) -> bool:
        return tuple(m.weight.shape) == (m.out_features, m.in_features)

    def unfold_reason(self, m: nn.Linear) -> str | None:
        return None

    def unfold_input(self, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return with_bias_column(x.reshape(-1, x.shape[-1]), m)

    def output_rows(self, m: nn.Linear, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, y.shape[-1])

    def run_with(self, m: nn.Linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class EmbeddingRule(LayerRule):
    """nn.Embedding: a lookup table whose columns are the units of a new group (the indices carry none)."""

    attrs = ("embedding_dim",)

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Embedding, name: str) -> Any:
        out_s = a.shape(node)
        g = a.new_group(m.embedding_dim, name)
        a.members[g].append(Member(f"{name}.weight", 1, "producer", "weight", name))
        a.channel_dims[g].append((node.name, len(out_s) - 1))
        return [None] * (len(out_s) - 1) + [((g, 1),)]

    def rederive(self, m: nn.Embedding, before: dict[str, Any]) -> None:
        m.embedding_dim = m.weight.shape[1]

    def check(self, m: nn.Embedding) -> bool:
        return m.weight.shape[1] == m.embedding_dim


class ConvRule(LayerRule):
    """Conv1d/2d/3d. groups=1: consumer + producer. Grouped with in == out channels (depthwise is one
    channel per group): the units pass through, and the group grows by whole conv groups."""

    attrs = ("in_channels", "out_channels", "groups")
    linear_map = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.modules.conv._ConvNd, name: str) -> Any:
        lay, s = _input(a, node)
        out_s = a.shape(node)
        if any(d is not None for d in lay[2:]):
            a.block_layout(lay[2:], "UnsupportedOpError", f"conv {name!r} slides over a grown dim")
        cin, cout, groups = m.in_channels, m.out_channels, m.groups
        rest = [None] * (len(out_s) - 2)
        if groups == 1:
            a.add_members(lay[1], f"{name}.weight", 1, "consumer", "weight", name)
            g = _producer(a, m, name, cout, node, 1)
            return [lay[0], ((g, 1),)] + rest
        if cin == cout:
            if lay[1] is not None:
                a.add_members(lay[1], f"{name}.weight", 0, "passthrough", "weight", name)
                if m.bias is not None:
                    a.add_members(lay[1], f"{name}.bias", 0, "passthrough", "bias", name)
                if cin // groups > 1:
                    if len(lay[1]) != 1:
                        a.block_layout([lay[1]], "UnsupportedOpError", f"grouped conv {name!r} reads a concatenation")
                    for g in a.groups_in([lay[1]]):
                        a.constraints[g].append(Constraint("conv_groups", name, cin // groups))
            return [lay[0], lay[1]] + rest
        reason = f"grouped conv {name!r} (groups={groups}) changes the channel count ({cin} -> {cout})"
        a.block_layout([lay[1]], "UnsupportedOpError", reason)
        g = a.new_group(cout, name)
        a.block(g, "UnsupportedOpError", reason)
        return [lay[0], ((g, 1),)] + rest

    def rederive(self, m: nn.modules.conv._ConvNd, before: dict[str, Any]) -> None:
        m.out_channels = m.weight.shape[0]
        if before["groups"] > 1 and before["in_channels"] == before["out_channels"]:
            per_group = before["in_channels"] // before["groups"]
            m.in_channels = m.out_channels
            m.groups = m.out_channels // per_group
        else:
            m.in_channels = m.weight.shape[1] * m.groups

    def check(self, m: nn.modules.conv._ConvNd) -> bool:
        return m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels

    def unfold_reason(self, m: nn.modules.conv._ConvNd) -> str | None:
        if m.groups != 1 and not (m.groups == m.in_channels == m.out_channels):
            return "is a grouped convolution"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "uses non-zero or string padding"
        return None

    def per_channel(self, m: nn.modules.conv._ConvNd) -> bool:
        return m.groups != 1 and m.groups == m.in_channels  # (unfolds only with in == out: `unfold_reason`)

    def unfold_input(self, m: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
        X = unfold_patches(x, m.kernel_size, m.stride, m.padding, m.dilation)  # [rows, C_in * k]
        if self.per_channel(m):  # depthwise: unit c reads its own channel's patch
            X = X.reshape(X.shape[0], m.out_channels, -1)
        return with_bias_column(X, m)

    def output_rows(self, m: nn.modules.conv._ConvNd, y: torch.Tensor) -> torch.Tensor:
        return y.movedim(1, -1).reshape(-1, y.shape[1])

    def run_with(
        self, m: nn.modules.conv._ConvNd, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
        groups = weight.shape[0] if self.per_channel(m) else 1  # depthwise keeps one filter per channel
        return conv(x, weight, bias, m.stride, m.padding, m.dilation, groups)

    def conv_geometry(self, m: nn.modules.conv._ConvNd) -> dict[str, tuple[int, ...]] | None:
        return {"kernel": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": tuple(m.padding),
                "dilation": tuple(m.dilation)}


def _norm_members(a: Propagation, dl: Any, m: nn.Module, name: str, stats: bool) -> None:
    if getattr(m, "weight", None) is not None:
        a.add_members(dl, f"{name}.weight", 0, "norm", "norm_weight", name)
    if getattr(m, "bias", None) is not None:
        a.add_members(dl, f"{name}.bias", 0, "norm", "norm_bias", name)
    if stats:
        a.add_members(dl, f"{name}.running_mean", 0, "norm", "running_mean", name)
        a.add_members(dl, f"{name}.running_var", 0, "norm", "running_var", name)


class BatchNormRule(LayerRule):
    running_stats = True
    attrs = ("num_features",)

    def propagate(self, a: Propagation, node: fx.Node, m: nn.modules.batchnorm._NormBase, name: str) -> Any:
        lay, _ = _input(a, node)
        if lay[1] is not None:
            _norm_members(a, lay[1], m, name, m.track_running_stats and m.running_mean is not None)
        return list(lay)

    def rederive(self, m: nn.modules.batchnorm._NormBase, before: dict[str, Any]) -> None:
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]

    def check(self, m: nn.modules.batchnorm._NormBase) -> bool:
        return m.running_mean is None or m.running_mean.shape[0] == m.num_features


class GroupNormRule(LayerRule):
    attrs = ("num_channels", "num_groups")

    def propagate(self, a: Propagation, node: fx.Node, m: nn.GroupNorm, name: str) -> Any:
        lay, _ = _input(a, node)
        dl = lay[1]
        if dl is not None:
            _norm_members(a, dl, m, name, False)
            if len(dl) != 1:
                a.block_layout([dl], "UnsupportedOpError", f"GroupNorm {name!r} normalises a concatenation of groups")
            for g in a.groups_in([dl]):
                a.constraints[g].append(Constraint("groupnorm", name, m.num_channels // m.num_groups))
        return list(lay)

    def rederive(self, m: nn.GroupNorm, before: dict[str, Any]) -> None:
        per_group = before["num_channels"] // before["num_groups"]
        if m.weight is not None:
            m.num_channels = m.weight.shape[0]
            m.num_groups = m.num_channels // per_group

    def check(self, m: nn.GroupNorm) -> bool:
        return m.weight is None or (m.weight.shape[0] == m.num_channels and m.num_channels % m.num_groups == 0)


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
        lay, _ = _input(a, node)
        shape = getattr(m, "normalized_shape", None)
        k = len(shape) if shape is not None else 1
        normed = lay[len(lay) - k :]
        if any(d is not None for d in normed):
            if k != 1:
                why = f"{type(m).__name__} {name!r} normalises several dims including a grown one"
                a.block_layout(normed, "UnsupportedOpError", why)
            else:
                _norm_members(a, normed[0], m, name, False)
                for g in a.groups_in([normed[0]]):
                    a.constraints[g].append(Constraint(self.constraint, name))
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
    An epsilon of None (nn.RMSNorm's default) is the dtype's machine epsilon, set explicitly on growth."""

    constraint = "rmsnorm"

    def __init__(self, eps_attr: str = "eps") -> None:
        self.eps_attr = eps_attr
        self.attrs = ("normalized_shape", eps_attr)

    def norm_eps(self, m: nn.Module) -> tuple[str, float] | None:
        eps = getattr(m, self.eps_attr, None)
        if eps is None:
            ref = getattr(m, "weight", None)
            eps = torch.finfo(ref.dtype if ref is not None else torch.get_default_dtype()).eps
        return (self.eps_attr, float(eps))


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
            if size == g.width * len(gains) > g.width and all(m.inner == 1 for m in gains):
                return (
                    f"group {g.name!r}: {what} {c.module!r} normalises its {g.width} units {len(gains)} times over "
                    "(positions merged into channels, as in a patch merging): new units at one copy's mean move "
                    "the statistics of all; duplicate every unit once (exact), or pass approximate=True"
                )
            if size != g.width or gains[0].inner != 1 or gains[0].offset != 0:
                return (
                    f"group {g.name!r}: {what} {c.module!r} normalises {size} units, more than this group's "
                    f"{g.width}; new units would have to follow the other groups too (pass approximate=True)"
                )
        if centre:
            scaled = layer_scales(g, model)
            bad = [
                m.tensor
                for m in g.members
                if (m.role == "elementwise" and m.kind != "additive" and m not in scaled.values())
                or m.role == "passthrough"
                or (m.role in ("producer", "elementwise") and m.per > 1)
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
    producers = {m.module for m in g.members if m.role == "producer"}
    out: dict[str, Member] = {}
    for m in g.members:
        if m.role != "elementwise" or m.kind != "multiplicative" or m.scales not in producers or m.per != 1:
            continue
        if m.inner != 1 or m.scales in out:
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
                for r in range(m.inner):
                    slices = t.index_select(m.dim, old[:, r])
                    if m.role == "producer" and m.module in scales:
                        gamma = scales[m.module]
                        g_t = grown.tensor(gamma.tensor)
                        g_old = torch.cat([grown.positions(gamma, "old"), grown.positions(gamma, "twin")]).flatten()
                        shape = [1] * slices.dim()
                        shape[m.dim] = -1
                        slices = slices * g_t.flatten()[g_old.to(g_t.device)].to(slices.dtype).view(shape)
                    value = (mean_slice if centre else zero_slice)(slices, m.dim)
                    shape = list(t.shape)
                    shape[m.dim] = new.shape[0]
                    value = value.expand(shape)
                    given = m.tensor in offsets or member_key(m) in offsets
                    if m.role == "producer" and given:  # a plan's values move the new unit off the mean
                        value = value + t.index_select(m.dim, new[:, r])
                    t.index_copy_(m.dim, new[:, r], value)
            for c, mod, (attr, eps) in norms:
                for m in g.members:
                    if m.module != c.module or m.role != "norm":
                        continue
                    t = grown.tensor(m.tensor)
                    if m.kind == "norm_weight":
                        keep = torch.cat([grown.positions(m, "old"), grown.positions(m, "twin")]).flatten().to(t.device)
                        t.index_copy_(m.dim, keep, t.index_select(m.dim, keep) * math.sqrt(factor))
                    elif m.kind == "norm_bias":
                        t.index_fill_(m.dim, grown.positions(m, "new").flatten().to(t.device), 0)
                grown.set_attr(mod, attr, eps * factor)

    return complete


def across_reason(constraints: list[Constraint], g: Any, model: nn.Module) -> str | None:
    """A normalised stream whose units also pass along another dim of a Linear (MLP-Mixer's token-mixing MLP
    maps each channel's tokens): a new channel, exactly zero after the norm, comes back into the stream as that
    MLP's output on zeros, not as the mean of the old channels (LayerNorm) nor zero (RMSNorm with biases), and
    no completion of the writers' slices reaches it. Other groups are free there (new units are any value)."""
    norms = [c for c in g.constraints if c.kind in ("layernorm", "rmsnorm")]
    if not norms:
        return None
    return (
        f"group {g.name!r} is normalised by {norms[0].module!r}, and its units also pass along another dim of "
        f"Linear {constraints[0].module!r} (token mixing): a new unit, zero after the norm, comes back into the "
        "stream as that layer's output on zeros, not the mean of the old units, so no completion makes it exact "
        "(grow the MLPs, duplicate every unit, or pass approximate=True)"
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
    return list(lay)


class PoolRule(LayerRule):
    """Pooling, upsampling and padding act per channel over the spatial dims."""

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        return shapeops.channel_pass(a, node, next(arg for arg in node.args if isinstance(arg, fx.Node)))


class FlattenRule(LayerRule):
    def propagate(self, a: Propagation, node: fx.Node, m: nn.Flatten, name: str) -> Any:
        return shapeops.flatten_dims(a, node, node.args[0], m.start_dim, m.end_dim)


class UnflattenRule(LayerRule):
    def propagate(self, a: Propagation, node: fx.Node, m: nn.Unflatten, name: str) -> Any:
        return shapeops.reshape(a, node)


class SoftmaxRule(LayerRule):
    def propagate(self, a: Propagation, node: fx.Node, m: nn.Softmax, name: str) -> Any:
        return shapeops.softmax_dim(a, node, node.args[0], m.dim)


for _t in PASS_THROUGH_MODULES:
    register_rule(_t, PassThroughRule())
for _t in (
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
):
    register_rule(_t, PoolRule())
register_rule(nn.Linear, LinearRule())
register_rule(nn.Embedding, EmbeddingRule())
shapeops.register_function_rule(F.layer_norm, layer_norm_function)
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_t, ConvRule())
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_rule(_t, BatchNormRule())
register_rule(nn.GroupNorm, GroupNormRule())
register_rule(nn.LayerNorm, LayerNormRule())
register_rule(nn.Flatten, FlattenRule())
register_rule(nn.Unflatten, UnflattenRule())
register_rule(nn.Softmax, SoftmaxRule())
register_rule(nn.LogSoftmax, SoftmaxRule())
register_constraint("groupnorm", lambda c, g, s, n, ap: whole_blocks("normalised by GroupNorm", c, g, s, n, ap))
register_constraint("conv_groups", lambda c, g, s, n, ap: whole_blocks("convolved by grouped conv", c, g, s, n, ap))
register_constraint(
    "across",
    lambda c, g, s, n, ap: None,  # new units are free there unless a norm completes the group (`across_reason`)
    reason=across_reason,
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
        a.block(a.new_group(m.head_dim, f"{name}.head_dim"), "FrozenGroupError", f"nn.MultiheadAttention {name!r} "
                "does not grow head_dim: num_heads x head_dim is its embed_dim, so each head's dims grow only with "
                "that width, by whole heads (use an attention with a head size of its own: models.transformer."
                "HeadAttention, timm's, Hugging Face's)")
        layouts = [a.layout_or_fixed(x)[0] for x in inputs]
        grown = [lay[-1] for lay in layouts if lay[-1] is not None]
        for lay in layouts:  # only the embedding dim may carry units
            a.block_layout(
                lay[:-1], "UnsupportedOpError", f"nn.MultiheadAttention {name!r} mixes tokens of a grown dim"
            )
        reason = None
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.in_proj_weight is None:
            reason = "has separate q/k/v projections or bias_k/bias_v (register a rule for it)"
        elif grown and (len(grown) != len(layouts) or any(len(dl) != 1 for dl in grown)):
            reason = "reads a fixed-width or concatenated input"
        if reason is not None or not grown:
            if reason is not None:
                a.block_layout(grown, "FrozenGroupError", f"nn.MultiheadAttention {name!r} {reason}")
            return tuple(outs) if multi else outs[0]
        g = grown[0][0][0]
        for dl in grown[1:]:
            g = a.union(g, dl[0][0], node)
        g = a.find(g)
        dl = ((g, 1),)
        e = m.embed_dim
        a.add_members(dl, f"{name}.in_proj_weight", 1, "consumer", "weight", name)
        for k in range(3):  # q, k, v rows: three blocks of embed_dim
            a.members[g].append(Member(f"{name}.in_proj_weight", 0, "producer", "weight", name, k * e))
            if m.in_proj_bias is not None:
                a.members[g].append(Member(f"{name}.in_proj_bias", 0, "producer", "bias", name, k * e))
        out = f"{name}.out_proj"
        a.members[g].append(Member(f"{out}.weight", 1, "consumer", "weight", out))
        a.members[g].append(Member(f"{out}.weight", 0, "producer", "weight", out))
        if m.out_proj.bias is not None:
            a.members[g].append(Member(f"{out}.bias", 0, "producer", "bias", out))
        a.constraints[g].append(Constraint("blocks", name, m.head_dim))
        outs[0][-1] = dl
        return tuple(outs) if multi else outs[0]

    def rederive(self, m: nn.MultiheadAttention, before: dict[str, Any]) -> None:
        m.embed_dim = m.out_proj.weight.shape[0]
        m.kdim = m.vdim = m.embed_dim
        m.head_dim = before["head_dim"]
        m.num_heads = m.embed_dim // m.head_dim

    def check(self, m: nn.MultiheadAttention) -> bool:
        w = m.in_proj_weight
        return m.num_heads * m.head_dim == m.embed_dim and (
            w is None or tuple(w.shape) == (3 * m.embed_dim, m.embed_dim)
        )


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())


class TransformerEncoderLayerRule(LayerRule):
    """nn.TransformerEncoderLayer is traced into (its attention and Linear layers carry the rules); post-norm
    (`norm_first=False`) it normalises the stream after the residual add."""

    leaf = False

    def post_norm(self, m: nn.TransformerEncoderLayer) -> bool:
        return not m.norm_first


register_rule(nn.TransformerEncoderLayer, TransformerEncoderLayerRule())
