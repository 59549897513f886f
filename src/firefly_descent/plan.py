"""Plans: pure, printable, serialisable descriptions of a growth step.

A plan never holds tensors of the live model. It names groups (and embeds a snapshot of each
group's members, so applying it needs no re-analysis), says which units are split along which
direction, which new units are added with which incoming/outgoing weights, and which new layers
are inserted where. Every growth method writes a plan; `engine.apply` is the only reader.

Shapes of the tensors a plan carries (one group unit's *slice* of a member tensor is the tensor
narrowed to that unit's `inner` positions along the member's dim, in the model's current shape):
  Split.directions[tensor]    one slice          (added to the parent, subtracted from the twin, times eps)
  NewUnits.incoming[tensor]   [count, *slice]    producer slices (incoming weights, bias)
  NewUnits.outgoing[tensor]   [count, *slice]    consumer slices (outgoing weights)
  NewUnits.passthrough[tensor] [count, *slice]   depthwise filters etc.
A tensor holding several segments of one group along its dim (GPT-2's c_attn: q, k and v rows of each head)
takes the same values in each segment under its own name, or per segment under `member_key(member)`
("tensor@offset"), which wins where both are given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from .analysis.graph import Group, member_key
from .analysis.rules import completed_roles
from .errors import PlanError


def values_for(values: dict[str, torch.Tensor], member: Any) -> torch.Tensor | None:
    """A member's values in a plan dict: under its own key, else under its tensor's name (None: not given)."""
    v = values.get(member_key(member))
    return values.get(member.tensor) if v is None else v


@dataclass
class Split:
    """Split unit `unit` into parent θ + eps·δ and twin θ − eps·δ, consumers' weights halved and shared."""

    unit: int
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    eps: float = 1.0
    position: int | None = None  # where the twin goes (before old unit `position`); None = appended


@dataclass
class NewUnits:
    """Add `count` fresh units: incoming weights from `incoming`, outgoing from `outgoing` (zeros if absent)."""

    count: int
    incoming: dict[str, torch.Tensor] = field(default_factory=dict)
    outgoing: dict[str, torch.Tensor] = field(default_factory=dict)
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: list[int] | None = None  # per unit, insert before old unit p; None = appended
    init: str = "zero"  # default for missing incoming weights: "zero" or "random" (kaiming-uniform)


@dataclass
class GroupChange:
    """All changes to one group."""

    group: Group
    splits: list[Split] = field(default_factory=list)
    new: NewUnits | None = None

    @property
    def added(self) -> int:
        return len(self.splits) + (self.new.count if self.new else 0)


@dataclass
class NewLayer:
    """Insert a layer after module `after`.

    kind "residual": z -> z + scale·h(z), h built from `spec` (identity when scale = 0).
    kind "identity": z -> h(z) with h identity-initialised (Net2Net deepening; needs z >= 0 for ReLU).
    kind "copy": z -> b(z), b a copy of module `after` with the parameters in `spec["zero"]` zeroed (a new
    transformer block whose residual branches start at zero).
    `params` optionally gives h's state_dict; `scale` the residual scale.
    """

    after: str
    kind: str = "residual"
    spec: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: float = 0.0


@dataclass
class NewBranch:
    """Add a branch x -> scale·h(x) into the sum that module `into` computes (identity at scale = 0).

    `into` must sum its branches and accept new ones (`add_branch(module, **args)` and
    `remove_last_branch()`, e.g. a DARTS cell node); `args` says what the branch reads (for a DARTS node
    `{"source": j, "op": name}`). h is built from `spec` (`layers.build_body`); `params` optionally gives
    its state_dict. The engine wraps h as `ScaledBranch(h, scale)`.
    """

    into: str
    spec: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: float = 0.0


@dataclass
class Plan:
    """A complete growth step: group changes and new layers, applied atomically by the engine."""

    changes: list[GroupChange] = field(default_factory=list)
    layers: list[NewLayer] = field(default_factory=list)
    function_preserving: bool = True  # the engine verifies outputs are unchanged (to tolerance)
    approximate: bool = False  # opt-in for changes that cannot be exact (LayerNorm over new units)
    method: str = "manual"
    tolerance: float = 1e-4
    shapes: dict[str, list[int]] = field(default_factory=dict)  # model tensor shapes the plan was made for
    input_shapes: list[list[int]] = field(default_factory=list)  # for verification when no inputs are given
    branches: list[NewBranch] = field(default_factory=list)
    # values of tensors the plan resizes, named as in the grown model, set by the engine after the resize (a
    # method that trained the new entries in a copy: Firefly cell growth's wider cells); such a plan is not scaled
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.layers and not self.branches and all(c.added == 0 for c in self.changes)

    def scaled(self, amplitude: float) -> Plan:
        """The same structure with every function-changing value times `amplitude`: split steps
        (eps), new units' outgoing weights, new layers' residual scales, and the incoming values a
        completed group's new units take on top of their completion (`_offsets`: a normalised stream's
        mean). Other incoming weights, twins' copies and new layers' bodies are kept (new branches' scales
        are multiplied too), so amplitude 0 is function-preserving and the loss along amplitudes is the line
        the growth step moves on."""
        a = float(amplitude)
        if self.values and a != 1.0:
            raise PlanError("a plan that sets tensor values (Plan.values) cannot be scaled")
        changes = [
            GroupChange(
                c.group,
                splits=[Split(s.unit, s.directions, s.eps * a, s.position) for s in c.splits],
                new=None
                if c.new is None
                else NewUnits(
                    c.new.count,
                    {k: v * a if k in _offsets(c.group) else v for k, v in c.new.incoming.items()},
                    {k: v * a for k, v in c.new.outgoing.items()},
                    c.new.passthrough,
                    c.new.positions,
                    c.new.init,
                ),
            )
            for c in self.changes
        ]
        layers = [NewLayer(ly.after, ly.kind, ly.spec, ly.params, ly.scale * a) for ly in self.layers]
        return Plan(
            changes,
            layers,
            function_preserving=self.function_preserving or a == 0.0,
            approximate=self.approximate,
            method=self.method,
            tolerance=self.tolerance,
            shapes=self.shapes,
            input_shapes=self.input_shapes,
            branches=[NewBranch(b.into, b.spec, b.args, b.params, b.scale * a) for b in self.branches],
            values=self.values,
        )

    def explain(self) -> str:
        """Human-readable summary of the plan."""
        lines = [
            f"Plan from {self.method}: {len(self.changes)} group(s), {len(self.layers)} new layer(s)"
            + (f", {len(self.branches)} new branch(es)" if self.branches else "")
            + (" [function-preserving]" if self.function_preserving else "")
            + (" [approximate]" if self.approximate else "")
        ]
        for c in self.changes:
            n_new = c.new.count if c.new else 0
            eps = [s.eps for s in c.splits if s.directions]
            pert = f", perturbed x{len(eps)} (max eps {max(eps):.3g})" if eps else ""
            units = ", ".join(str(s.unit) for s in c.splits[:8]) + (" …" if len(c.splits) > 8 else "")
            lines.append(
                f"  {c.group.name:<32} width {c.group.width:>5} -> {c.group.width + c.added:<5}"
                f" split {len(c.splits)}{f' [{units}]' if c.splits else ''}{pert}, new {n_new}"
            )
        for layer in self.layers:
            desc = layer.spec.get("type", "?")
            lines.append(f"  new {layer.kind} layer {desc} after {layer.after!r} (scale {layer.scale:g})")
        for b in self.branches:
            desc = b.spec.get("op", b.spec.get("type", "?"))
            lines.append(f"  new branch {desc} {dict(b.args)} into {b.into!r} (scale {b.scale:g})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self, tensors: bool = True) -> dict[str, Any]:
        """Plain data (tensors kept as CPU tensors unless `tensors=False`, then dropped)."""

        def t(d: dict[str, torch.Tensor]) -> dict[str, Any]:
            return {k: v.detach().cpu() for k, v in d.items()} if tensors else {}

        return {
            "method": self.method,
            "function_preserving": self.function_preserving,
            "approximate": self.approximate,
            "tolerance": self.tolerance,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "input_shapes": [list(x) for x in self.input_shapes],
            "changes": [
                {
                    "group": c.group.to_dict(),
                    "splits": [
                        {"unit": s.unit, "eps": s.eps, "position": s.position, "directions": t(s.directions)}
                        for s in c.splits
                    ],
                    "new": None
                    if c.new is None
                    else {
                        "count": c.new.count,
                        "positions": c.new.positions,
                        "init": c.new.init,
                        "incoming": t(c.new.incoming),
                        "outgoing": t(c.new.outgoing),
                        "passthrough": t(c.new.passthrough),
                    },
                }
                for c in self.changes
            ],
            "layers": [
                {"after": ly.after, "kind": ly.kind, "spec": dict(ly.spec), "scale": ly.scale, "params": t(ly.params)}
                for ly in self.layers
            ],
            "branches": [
                {"into": b.into, "spec": dict(b.spec), "args": dict(b.args), "scale": b.scale, "params": t(b.params)}
                for b in self.branches
            ],
            # only where set: growth histories (tensors=False) of every other plan keep their old records
            **({"values": t(self.values)} if self.values and tensors else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        changes = []
        for c in d["changes"]:
            new = c.get("new")
            changes.append(
                GroupChange(
                    group=Group.from_dict(c["group"]),
                    splits=[
                        Split(s["unit"], dict(s.get("directions", {})), s.get("eps", 1.0), s.get("position"))
                        for s in c["splits"]
                    ],
                    new=None
                    if new is None
                    else NewUnits(
                        new["count"],
                        dict(new.get("incoming", {})),
                        dict(new.get("outgoing", {})),
                        dict(new.get("passthrough", {})),
                        new.get("positions"),
                        new.get("init", "zero"),
                    ),
                )
            )
        layers = [
            NewLayer(ly["after"], ly["kind"], dict(ly["spec"]), dict(ly.get("params", {})), ly["scale"])
            for ly in d.get("layers", [])
        ]
        return cls(
            changes,
            layers,
            d.get("function_preserving", True),
            d.get("approximate", False),
            d.get("method", "manual"),
            d.get("tolerance", 1e-4),
            {k: list(v) for k, v in d.get("shapes", {}).items()},
            [list(x) for x in d.get("input_shapes", [])],
            [
                NewBranch(b["into"], dict(b["spec"]), dict(b.get("args", {})), dict(b.get("params", {})), b["scale"])
                for b in d.get("branches", [])
            ],
            dict(d.get("values", {})),
        )

    def save(self, path: str) -> None:
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str) -> Plan:
        return cls.from_dict(torch.load(path, weights_only=True))

    def to_bytes(self) -> bytes:
        """Serialise (e.g. to broadcast a plan from rank 0 to other processes)."""
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Plan:
        return cls.from_dict(torch.load(io.BytesIO(data), weights_only=True))


def _offsets(group: Group) -> set[str]:
    """Producer tensors whose new-unit incoming values are offsets on the group's completion (with them the
    new units are no longer the completion's exact values, so they change the function)."""
    if "producer" not in completed_roles(group):
        return set()
    return {key for m in group.members if m.role == "producer" for key in (m.tensor, member_key(m))}
