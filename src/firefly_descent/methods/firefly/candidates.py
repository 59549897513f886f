"""Firefly's over-grown network, built with the engine.

The engine first widens a copy of the model with *every* candidate switched off: each unit split
with a zero direction (parent and twin identical, consumers halved) and K new units with zero
incoming and outgoing weights, so the copy computes exactly f_t. Then each touched tensor gets a
`torch.nn.utils.parametrize` parametrisation that adds the candidates' trainable perturbations,
each scaled by a per-candidate gate `alpha + g_i`:

  split i   parent rows  + (alpha + g_i) v_i,   twin rows  - (alpha + g_i) v_i
  new j     incoming rows  d_j (ungated),        outgoing columns  (alpha + g_j) u_j
            (in a LayerNorm'd/RMSNorm'd stream the engine sets the incoming rows to the completion, the mean,
            and the candidate adds (alpha + g_j) d_j on top: the mean alone is zero after the norm)
  layer l   z + (alpha + g_l) s_l h_l(z)   (a separate copy with all new-layer candidates)

v, d, u live in the *original* coordinates of every other dim and are mapped into the over-grown
tensor exactly as the engine maps plan slices, so a kept candidate's trained values can be handed
to the engine as a plan for the original model unchanged. With g = 0 as a leaf tensor, one
backward pass gives dL/dg_i for all candidates at once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from ...analysis import Group, GrowthGraph
from ...analysis.norm_stream import layer_scales
from ...analysis.rules import (
    completed_new_slices,
    completed_roles,
    splits_whole_only,
    takes_new_units,
)
from ...engine import apply, plan_edits, plan_expansions
from ...engine.tensors import NEW, OLD, TWIN, Expansion, unit_order
from ...plan import GroupChange, NewUnits, Plan, Split, member_key


class GateBank:
    """Per-candidate gates shared by all tensors of a candidate: multiplier = alpha + g."""

    def __init__(self) -> None:
        self.alpha = 1.0
        self.gates: dict[str, torch.Tensor] = {}

    def add(self, key: str, n: int, like: torch.Tensor) -> None:
        self.gates[key] = torch.zeros(n, device=like.device, dtype=like.dtype)

    def mult(self, key: str) -> torch.Tensor:
        return self.alpha + self.gates[key]

    def reset(self, requires_grad: bool) -> None:
        for k, g in self.gates.items():
            self.gates[k] = torch.zeros_like(g).requires_grad_(requires_grad)


@dataclass
class _Contribution:
    dim: int
    value: nn.Parameter  # [n, *slice in original coordinates]
    positions: torch.Tensor  # [n * inner] positions along dim in the over-grown tensor
    inner: int
    gate: str | None  # gate key, or None (ungated)
    sign: float
    others: list[Expansion]  # expansions of the other dims
    scale: torch.Tensor | None = None  # the perturbation is value * scale (value in units of the layer's weights)


class CandidatePerturbation(nn.Module):
    """Parametrisation W -> W + sum of gated candidate perturbations (see module docstring)."""

    def __init__(self, bank: GateBank) -> None:
        super().__init__()
        self.bank = bank
        self.values = nn.ParameterList()
        self.contribs: list[_Contribution] = []
        self.ops: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []
        # per contribution, device and dtype: the other-dim indices and multipliers on that device and the row
        # placement index; they depend only on shapes, so every forward (step one's steps, step two's
        # points) reuses them instead of rebuilding them (and copying them to the GPU) each time
        self._moved: dict[tuple[int, torch.device, torch.dtype], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self._places: dict[tuple[int, torch.device, int, int], torch.Tensor] = {}

    def add(self, c: _Contribution) -> None:
        if not any(c.value is v for v in self.values):
            self.values.append(c.value)
        self.contribs.append(c)
        # precompute index and multiplier of every other-dim expansion (done once, used every forward)
        ops = []
        for dim, smap, scale in c.others:
            keep = ((smap.kind == OLD) | (smap.kind == TWIN)).to(torch.float64) * scale
            shape = [1] * (c.value.dim())
            shape[dim + 1] = -1
            ops.append((dim + 1, smap.src.clamp(min=0), keep.view(shape)))
        self.ops.append(ops)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = w
        for i, (c, ops) in enumerate(zip(self.contribs, self.ops)):
            v = c.value if c.scale is None else c.value * c.scale.to(c.value.device, c.value.dtype)
            if c.gate is not None:
                m = self.bank.mult(c.gate)
                v = v * m.view(-1, *([1] * (v.dim() - 1)))
            if c.sign != 1.0:
                v = v * c.sign
            for dim, idx, mult in self._ops_on(i, ops, v.device, v.dtype):
                v = v.index_select(dim, idx) * mult
            v = v.movedim(0, c.dim).flatten(c.dim, c.dim + 1)  # [.., n*inner, ..]
            # place rows by a gather from [v; 0] (index_add stalls in multi-threaded CPU runs under load)
            zero = torch.zeros_like(v.narrow(c.dim, 0, 1))
            place = self._place(i, c, w, v.shape[c.dim])
            out = out + torch.cat([v, zero], dim=c.dim).index_select(c.dim, place)
        return out

    def _ops_on(
        self, i: int, ops: list[tuple[int, torch.Tensor, torch.Tensor]], device: torch.device, dtype: torch.dtype
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Contribution i's other-dim expansions with their index on `device` and multiplier in `dtype`."""
        key = (i, device, dtype)
        moved = self._moved.get(key)
        if moved is None:
            moved = [(dim, idx.to(device), mult.to(device).to(dtype)) for dim, idx, mult in ops]
            self._moved[key] = moved
        return moved

    def _place(self, i: int, c: _Contribution, w: torch.Tensor, rows: int) -> torch.Tensor:
        """Where each row of the over-grown tensor takes its value from [v; 0]: row `rows` (the zero) except
        at the contribution's positions."""
        key = (i, w.device, w.shape[c.dim], rows)
        place = self._places.get(key)
        if place is None:
            place = torch.full((w.shape[c.dim],), rows, dtype=torch.long, device=w.device)
            place[c.positions.to(w.device)] = torch.arange(rows, device=w.device)
            self._places[key] = place
        return place


@dataclass
class WidthCandidates:
    """The over-grown copy for width candidates and handles on its trainable values."""

    net: nn.Module
    bank: GateBank
    groups: list[Group]
    width: dict[str, int]
    new_count: dict[str, int]
    split_dirs: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)  # group -> tensor -> [W, *slice]
    new_in: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)  # group -> tensor -> [K, *slice]
    new_out: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)  # group -> tensor -> [K, *slice]
    # value -> its scale: the candidate's weights are value * scale (relative parametrisation; 1 = absolute)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)
    # group -> tensor -> [K, *slice]: the new units' passthrough values (depthwise filters) as the engine drew
    # them in the over-grown copy; not trained, but a kept unit must take them, not a fresh random draw
    new_pass: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # group -> new units per candidate: an attention head's units (`block_size`), or for a normalised stream its
    # whole pool (`pool_block`); 1 otherwise
    blocks: dict[str, int] = field(default_factory=dict)

    def weights(self, value: nn.Parameter) -> torch.Tensor:
        """A candidate value in the model's own units."""
        s = self.scales.get(id(value))
        return value.detach() if s is None else value.detach() * s.to(value.device, value.dtype)

    def trainables(self) -> list[nn.Parameter]:
        out = []
        for d in (self.split_dirs, self.new_in, self.new_out):
            for per in d.values():
                out += list(per.values())
        return out


def _segment_starts(size: int, segs: list[Any]) -> dict[int, int]:
    """New-coordinate start of each segment (keyed by id) along one dim, walking like the engine."""
    starts, p, q = {}, 0, 0
    for seg in sorted(segs, key=lambda s: s.member.offset):
        q += seg.member.offset - p
        starts[id(seg)] = q
        q += len(seg.order) * seg.member.inner
        p = seg.member.offset + seg.change.group.width * seg.member.inner
    return starts


def _positions(start: int, order: list[tuple[int, int]], keys: list[tuple[int, int]], inner: int) -> torch.Tensor:
    index = {k: n for n, k in enumerate(order)}
    pos = [start + index[k] * inner + r for k in keys for r in range(inner)]
    return torch.tensor(pos, dtype=torch.long)


def _new_unit_values(
    t: torch.Tensor, m: Any, start: int, order: list[tuple[int, int]], count: int, others: list[Expansion]
) -> torch.Tensor:
    """The `count` new units' slices of over-grown tensor `t` along `m.dim`, [count, *slice], in the original
    coordinates of every other dim (its old positions), as a plan gives them."""
    pos = _positions(start, order, [(NEW, j) for j in range(count)], m.inner).to(t.device)
    v = t.detach().index_select(m.dim, pos)
    for dim, smap, _ in others:
        old = (smap.kind == OLD).nonzero().flatten()
        old = old[smap.src[old].argsort()]
        v = v.index_select(dim, old.to(t.device))
    return v.unflatten(m.dim, (count, m.inner)).movedim(m.dim, 0).clone()


def unit_rms(t: torch.Tensor, dim: int, offset: int, inner: int, width: int) -> torch.Tensor:
    """Root-mean-square of each of `width` units' slices of `t` along `dim` (a unit owns `inner` positions)."""
    block = t.narrow(dim, offset, width * inner).movedim(dim, 0).reshape(width, -1)
    return block.pow(2).mean(1).sqrt()


def pool_block(group: Group, new_count: int) -> int:
    """New units per candidate: `block_size` (a head's units, 1 for a plain group), or for a group whose
    completion makes new units the mean of the old (a LayerNorm'd/RMSNorm'd stream) the whole pool. There a
    candidate moves its units off the mean, which changes the norm's mean and variance over every unit, a
    candidate switched off too: a subset of the pool would not compute what the over-grown copy did with it,
    the whole pool does."""
    per = block_size(group) or 1
    if new_count and completed_new_slices(group) is not None and "producer" in completed_roles(group):
        return new_count
    return per


def block_size(group: Group) -> int | None:
    """Units per whole block Firefly grows `group` by: 1 without constraints, `head_dim` for attention heads
    (a `blocks` constraint: new whole heads only, no splits), None for a group Firefly leaves alone (a
    constraint that new units cannot meet exactly: GroupNorm, grouped conv; or a weight with one entry per
    block). A constraint whose kind completes new units exactly (a LayerNorm'd or RMSNorm'd stream, see
    `analysis.rules.register_constraint`) does not stand in the way."""
    if not takes_new_units(group):
        return None
    sizes = {c.channels_per_group for c in group.constraints if c.kind == "blocks"}
    if len(sizes) > 1:
        return None
    if any(m.per > 1 for m in group.members if m.kind == "weight" and m.role in ("producer", "consumer")):
        return None
    return sizes.pop() if sizes else 1


def splittable(group: Group) -> bool:
    """Whether each unit of `group` is a split candidate of its own: not heads, and no constraint that only
    takes whole duplication (a norm over the units)."""
    return block_size(group) == 1 and not splits_whole_only(group)


def _slice_numel(t: torch.Tensor, m: Any) -> int:
    return t.numel() // t.shape[m.dim] * m.inner


def _slice_shape(shape: list[int], dim: int, inner: int) -> list[int]:
    s = list(shape)
    s[dim] = inner
    return s


def build_width_candidates(
    model: nn.Module,
    graph: GrowthGraph,
    groups: list[Group],
    new_count: dict[str, int],
    splits: bool,
    example_inputs: tuple[torch.Tensor, ...],
    init: dict[str, float],
    generator: torch.Generator,
) -> WidthCandidates:
    """Deep-copy `model`, switch on every width candidate (off), and parametrise the perturbations."""
    changes = []
    split_groups = {g.name for g in groups if splits and splittable(g)}  # heads: new whole heads only
    for g in groups:
        k = new_count.get(g.name, 0)
        changes.append(
            GroupChange(
                g,
                splits=[Split(i) for i in range(g.width)] if g.name in split_groups else [],
                new=NewUnits(k) if k else None,
            )
        )
    plan = Plan(changes, function_preserving=True, method="firefly-candidates")
    net = copy.deepcopy(model)
    if hasattr(net, "_firefly_history"):
        net._firefly_history = []
    expansions = plan_expansions(net, plan)
    edits = plan_edits(plan)
    orig_shapes = {name: list(t.shape) for name, t in list(net.named_parameters()) + list(net.named_buffers())}
    apply(net, plan, example_inputs=example_inputs, record=False)
    for p in net.parameters():
        p.requires_grad_(False)
    ref = next(net.parameters())
    device = ref.device
    bank = GateBank()
    cands = WidthCandidates(net, bank, groups, {g.name: g.width for g in groups}, dict(new_count))
    cands.blocks = {g.name: pool_block(g, new_count.get(g.name, 0)) for g in groups}
    perts: dict[str, CandidatePerturbation] = {}

    offsets: dict[str, CandidatePerturbation] = {}  # applied after a completion: new units off their mean

    def pert(tensor: str, after_completion: bool = False) -> CandidatePerturbation:
        store = offsets if after_completion else perts
        if tensor not in store:
            store[tensor] = CandidatePerturbation(bank)
        return store[tensor]

    relative = bool(init.get("relative", False))
    originals = dict(model.named_parameters())

    def rand(shape: list[int], kind: str) -> torch.Tensor:
        if kind == "uniform_split":
            if relative:  # N(0, a^2) in units of the unit's own weight RMS
                t = torch.randn(shape, generator=generator) * init["split"]
            else:
                t = (torch.rand(shape, generator=generator) * 2 - 1) * init["split"]
        elif kind == "normal_in":
            t = torch.randn(shape, generator=generator) * init["new_in"]
        else:
            t = (torch.rand(shape, generator=generator) * 2 - 1) * init["new_out"]
        return t.to(ref.dtype)

    def scale_of(m: Any, width: int, per_unit: bool, n_dims: int) -> torch.Tensor | None:
        """Relative parametrisation: RMS of each unit's slice (per_unit) or their mean, shaped to
        broadcast over [n, *slice]; fan-in scaled 1/sqrt(slice size) where the weights are all zero."""
        if not relative:
            return None
        rms = unit_rms(originals[m.tensor].detach(), m.dim, m.offset, m.inner, width)
        fallback = 1.0 / math.sqrt(max(1, _slice_numel(originals[m.tensor], m)))
        rms = torch.where(rms > 0, rms, torch.full_like(rms, fallback))
        out = rms if per_unit else rms.mean().reshape(1)
        return out.view(-1, *([1] * n_dims)).to(device)

    for change in changes:
        g = change.group
        order = unit_order(change)
        K = change.new.count if change.new else 0
        split_g = g.name in split_groups
        if split_g:
            bank.add(f"split:{g.name}", g.width, ref)
        if K:
            bank.add(f"new:{g.name}", K, ref)
        cands.split_dirs[g.name], cands.new_in[g.name], cands.new_out[g.name] = {}, {}, {}
        cands.new_pass[g.name] = {}
        completed = completed_roles(g)  # the engine decides these new slices (a normalised stream's mean)
        for m in g.members:
            if K and m.role == "passthrough":
                segs = edits[m.tensor][m.dim]
                seg = next(s for s in segs if s.member == m and s.change is change)
                start = _segment_starts(orig_shapes[m.tensor][m.dim], segs)[id(seg)]
                others = [e for e in expansions[m.tensor] if e[0] != m.dim]
                mod_name, _, attr = m.tensor.rpartition(".")
                value = getattr(net.get_submodule(mod_name) if mod_name else net, attr)
                cands.new_pass[g.name][m.tensor] = _new_unit_values(value, m, start, order, K, others)
            if m.role not in ("producer", "consumer") or m.kind != "weight":
                continue
            # a tensor holding several segments of the group (GPT-2's c_attn: q, k, v rows per head) keeps one
            # set of values per segment, under the member's own key in the plan (`plan.member_key`)
            shared = sum(o.tensor == m.tensor and o.role == m.role and o.kind == m.kind for o in g.members) > 1
            key = member_key(m) if shared else m.tensor
            segs = edits[m.tensor][m.dim]
            seg = next(s for s in segs if s.member == m and s.change is change)
            start = _segment_starts(orig_shapes[m.tensor][m.dim], segs)[id(seg)]
            others = [e for e in expansions[m.tensor] if e[0] != m.dim]
            shape = _slice_shape(orig_shapes[m.tensor], m.dim, m.inner)
            if m.role == "producer":
                if split_g:
                    v = nn.Parameter(rand([g.width, *shape], "uniform_split").to(device))
                    cands.split_dirs[g.name][key] = v
                    sc = scale_of(m, g.width, True, len(shape))
                    pos_parent = _positions(start, order, [(OLD, i) for i in range(g.width)], m.inner)
                    pos_twin = _positions(start, order, [(TWIN, i) for i in range(g.width)], m.inner)
                    split_key = f"split:{g.name}"
                    pert(m.tensor).add(_Contribution(m.dim, v, pos_parent, m.inner, split_key, 1.0, others, sc))
                    pert(m.tensor).add(_Contribution(m.dim, v, pos_twin, m.inner, split_key, -1.0, others, sc))
                    if sc is not None:
                        cands.scales[id(v)] = sc
                if K:
                    d = nn.Parameter(rand([K, *shape], "normal_in").to(device))
                    cands.new_in[g.name][key] = d
                    pos_new = _positions(start, order, [(NEW, j) for j in range(K)], m.inner)
                    sc = scale_of(m, g.width, False, len(shape))
                    if "producer" in completed:
                        # the engine makes a new unit of a normalised stream the mean of the old ones (exact, but
                        # zero after the norm: no gradient reaches it); the candidate moves it off the mean by
                        # d, gated like its outgoing weights, since any move changes the norm's statistics
                        gate = f"new:{g.name}"
                        pert(m.tensor, True).add(_Contribution(m.dim, d, pos_new, m.inner, gate, 1.0, others, sc))
                    else:
                        pert(m.tensor).add(_Contribution(m.dim, d, pos_new, m.inner, None, 1.0, others, sc))
                    if sc is not None:
                        cands.scales[id(d)] = sc
            elif K:
                u = nn.Parameter(rand([K, *shape], "uniform_out").to(device))
                cands.new_out[g.name][key] = u
                pos_new = _positions(start, order, [(NEW, j) for j in range(K)], m.inner)
                sc = scale_of(m, g.width, False, len(shape))
                pert(m.tensor).add(_Contribution(m.dim, u, pos_new, m.inner, f"new:{g.name}", 1.0, others, sc))
                if sc is not None:
                    cands.scales[id(u)] = sc
    derived = _derived_slices(changes, edits, orig_shapes, set(perts) | set(offsets), model)
    for tensor in dict.fromkeys([*perts, *offsets]):
        mod_name, _, attr = tensor.rpartition(".")
        module = net.get_submodule(mod_name) if mod_name else net
        if tensor in perts:
            parametrize.register_parametrization(module, attr, perts[tensor])
        for d in derived.get(tensor, []):  # after the perturbations: the completion holds for their sum
            parametrize.register_parametrization(module, attr, d)
        if tensor in offsets:  # and the candidates' moves off the completion on top (as the engine adds them)
            parametrize.register_parametrization(module, attr, offsets[tensor])
    return cands


class _DerivedSlices(nn.Module):
    """Parametrisation keeping a completed group's new producer slices the function of the old slices that the
    engine's completion gives them (a normalised stream's mean), while other candidates perturb the old ones:
    the over-grown copy then computes what the engine will build from its kept candidates."""

    def __init__(self, dim: int, old: torch.Tensor, new: torch.Tensor, fn: Any) -> None:
        super().__init__()
        self.dim, self.fn = dim, fn
        self.register_buffer("old", old, persistent=False)
        self.register_buffer("new", new, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # over every old position, as the engine's completion: a norm's mean is over its whole dim
        value = self.fn(w.index_select(self.dim, self.old.flatten().to(w.device)), self.dim)
        shape = list(w.shape)
        shape[self.dim] = self.new.shape[0]
        for r in range(self.old.shape[1]):
            w = w.index_copy(self.dim, self.new[:, r].to(w.device), value.expand(shape))
        return w


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _weighted(fn: Any, weights: torch.Tensor) -> Any:
    """`fn` (the completion's new slice from the old ones) on the old slices times per-unit `weights` (a writer
    multiplied by LayerScale right after it: the completion weights its mean by the gammas)."""

    def apply(old: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * old.dim()
        shape[dim] = -1
        return fn(old * weights.to(old).view(shape), dim)

    return apply


def _derived_slices(
    changes: list[GroupChange], edits: dict[str, Any], orig_shapes: dict[str, list[int]], perturbed: set[str],
    model: nn.Module,
) -> dict[str, list[_DerivedSlices]]:
    """Per perturbed tensor, the derived-slice parametrisations of the completed groups it produces (weighted by
    the LayerScale gammas of `model`, the model before the over-grown copy, where a writer has one)."""
    out: dict[str, list[_DerivedSlices]] = {}
    for change in changes:
        g, K = change.group, change.new.count if change.new else 0
        fn = completed_new_slices(g)
        if not K or fn is None or "producer" not in completed_roles(g):
            continue
        order = unit_order(change)
        scales = layer_scales(g)
        for m in g.members:
            if m.role != "producer" or m.tensor not in perturbed:
                continue
            gamma = scales.get(m.module)
            weights = _tensor(model, gamma.tensor).detach().flatten().clone() if gamma is not None else None
            segs = edits[m.tensor][m.dim]
            seg = next(s for s in segs if s.member == m and s.change is change)
            start = _segment_starts(orig_shapes[m.tensor][m.dim], segs)[id(seg)]
            old = _positions(start, order, [(OLD, i) for i in range(g.width)], m.inner).view(g.width, m.inner)
            new = _positions(start, order, [(NEW, j) for j in range(K)], m.inner).view(K, m.inner)
            out.setdefault(m.tensor, []).append(
                _DerivedSlices(m.dim, old, new, fn if weights is None else _weighted(fn, weights))
            )
    return out


def materialize_width(cands: WidthCandidates, kept: dict[str, tuple[list[int], list[int]]]) -> list[GroupChange]:
    """Group changes for the original model: kept splits with trained directions, kept new units with
    their trained incoming and (gated, alpha = 1) outgoing weights and the passthrough values (depthwise
    filters) they had in the over-grown copy, so the grown model computes what the copy did with them on."""
    changes = []
    for g in cands.groups:
        split_units, new_units = kept.get(g.name, ([], []))
        if not split_units and not new_units:
            continue
        splits = [
            Split(i, {t: cands.weights(v)[i].clone() for t, v in cands.split_dirs[g.name].items()}, eps=1.0)
            for i in sorted(split_units)
        ]
        new = None
        if new_units:
            idx = torch.tensor(sorted(new_units), dtype=torch.long)
            new = NewUnits(
                len(new_units),
                incoming={t: cands.weights(v)[idx.to(v.device)].clone() for t, v in cands.new_in[g.name].items()},
                outgoing={t: cands.weights(v)[idx.to(v.device)].clone() for t, v in cands.new_out[g.name].items()},
                passthrough={t: v[idx.to(v.device)].clone() for t, v in cands.new_pass.get(g.name, {}).items()},
            )
        changes.append(GroupChange(g, splits=splits, new=new))
    return changes
