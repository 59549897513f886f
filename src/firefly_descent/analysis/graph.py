"""The result of analysis: growable groups of (tensor, dim) that change width together.

Everything here is plain data (names and integers), so it can be embedded in plans,
printed and serialised without holding any tensor of the live model.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ERROR_TYPES, GrowthError

# Roles decide how a member is edited when the group grows:
#   producer     its slices compute the units (incoming weights, bias): twins copy, new units take the plan's values
#   consumer     its slices read the units (outgoing weights): split halves and shares, new units take the plan's values
#   norm         per-unit normalisation parameters/statistics: twins copy, new units get a fresh channel
#   passthrough  per-unit parameters of a channel-preserving layer (depthwise conv): twins copy, no halving
#   elementwise  a parameter combined elementwise with the units (added bias, layer scale)
ROLES = ("producer", "consumer", "norm", "passthrough", "elementwise")
# Constraint kinds of groups that grow only when named (`analysis.rules.register_constraint(on_request=True)`).
ON_REQUEST: set[str] = set()


@dataclass(frozen=True)
class Member:
    """One (parameter or buffer, dim) whose size follows the group's width.

    Along `dim`, unit j of the group occupies positions `offset + j*inner … offset + (j+1)*inner - 1`
    (`inner > 1` after a flatten: one channel is H*W features). With `per > 1` a whole block of `per` units
    shares one position (`offset + (j // per) * inner`): the group grows by whole blocks only.
    """

    tensor: str  # qualified name, e.g. "features.0.weight"
    dim: int
    role: str
    # fill rule for new units: weight, bias, norm_weight, norm_bias, running_mean, running_var, additive,
    # multiplicative; query (drawn like a weight), query_bias, key, key_bias (zero): rows of attention's q·k
    kind: str
    module: str  # qualified name of the owning module
    offset: int = 0
    inner: int = 1
    per: int = 1  # units per position (> 1: one entry per block of units, e.g. a per-head bias of attention)
    scales: str = ""  # a multiplier's: the module whose producer slices of the group it multiplies (LayerScale)


@dataclass(frozen=True)
class Constraint:
    """A layer that limits how the group may grow (GroupNorm, LayerNorm)."""

    kind: str  # "groupnorm" | "layernorm"
    module: str
    channels_per_group: int = 1


@dataclass
class Group:
    """A set of (tensor, dim) that must change width together."""

    name: str
    width: int
    members: list[Member] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    blocked: tuple[str, str] | None = None  # (error type name, one-line reason)
    modules: list[str] = field(default_factory=list)  # producing modules, graph order
    channel_dims: list[tuple[str, int]] = field(default_factory=list)  # (fx node name, dim) carrying the units
    at_output: bool = False  # its units reach the model output (so a new layer there would change the output)

    @property
    def growable(self) -> bool:
        return self.blocked is None

    @property
    def on_request(self) -> bool:
        """Whether growers leave it alone unless it is named (an attention's head_dim)."""
        return any(c.kind in ON_REQUEST for c in self.constraints)

    def check_growable(self) -> None:
        """Raise the specific refusal recorded during analysis."""
        if self.blocked is not None:
            kind, reason = self.blocked
            raise ERROR_TYPES.get(kind, GrowthError)(f"group {self.name!r} cannot grow: {reason}")

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "width": self.width,
            "members": [asdict(m) for m in self.members],
            "constraints": [asdict(c) for c in self.constraints],
            "blocked": list(self.blocked) if self.blocked else None,
            "modules": list(self.modules),
            "channel_dims": [list(x) for x in self.channel_dims],
            "at_output": self.at_output,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(
            name=d["name"],
            width=int(d["width"]),
            members=[Member(**m) for m in d["members"]],
            constraints=[Constraint(**c) for c in d.get("constraints", [])],
            blocked=tuple(d["blocked"]) if d.get("blocked") else None,  # type: ignore[arg-type]
            modules=list(d.get("modules", [])),
            channel_dims=[tuple(x) for x in d.get("channel_dims", [])],  # type: ignore[misc]
            at_output=bool(d.get("at_output", False)),
        )

    def __str__(self) -> str:
        state = "growable" if self.growable else f"blocked ({self.blocked[1]})"  # type: ignore[index]
        if self.growable and self.on_request:
            state += " when named (growers leave it alone otherwise)"
        lines = [f"group {self.name!r}: width {self.width}, {state}"]
        for m in self.members:
            extra = f" offset={m.offset}" if m.offset else ""
            extra += f" inner={m.inner}" if m.inner != 1 else ""
            lines.append(f"    {m.role:<11} {m.tensor}[dim {m.dim}]{extra}")
        for c in self.constraints:
            lines.append(f"    constraint  {c.kind} {c.module}")
        return "\n".join(lines)


@dataclass
class Boundary:
    """A place where a new layer `z -> z + s*h(z)` may be inserted: after `module`, whose output has
    `channels` units of `group` on dim `channel_dim` of an `ndim`-dimensional tensor."""

    module: str
    group: str | None
    channels: int
    channel_dim: int
    ndim: int
    shape: tuple[int, ...]
    node: str = ""  # the traced node producing the output (boundaries sharing it are the same place)


@dataclass
class GrowthGraph:
    """Analysis result: the growable groups of a model, keyed by name."""

    groups: dict[str, Group]
    boundaries: dict[str, Boundary] = field(default_factory=dict)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    # the names of groups that analysis merged into another (a residual stream's producers, every Llama layer's
    # head_dim joined by the shared rotary embedding): looking one up gives the group it is part of
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Group:
        if name in self.groups:
            return self.groups[name]
        if name in self.aliases:
            return self.groups[self.aliases[name]]
        known = list(self.groups)
        if len(known) > 12:
            close = difflib.get_close_matches(name, known + list(self.aliases), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise GrowthError(f"no group named {name!r}; {hint}{len(known)} groups: print(ff.analyze(...)) lists "
                              "them") from None
        raise GrowthError(f"no group named {name!r}; known groups: {', '.join(known) or '(none)'}") from None

    def growable(self, on_request: bool = False) -> list[Group]:
        """The groups that can grow; those that grow only when named (`Group.on_request`) with `on_request=True`."""
        return [g for g in self.groups.values() if g.growable and (on_request or not g.on_request)]

    def widths(self) -> dict[str, int]:
        return {n: g.width for n, g in self.groups.items()}

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.groups.values())


def member_key(member: Member) -> str:
    """The key of one member's values in a plan (`tensor@offset`): for a tensor that holds several segments of
    the group along its dim, each with values of its own (`plan.values_for` reads it)."""
    return f"{member.tensor}@{member.offset}"
