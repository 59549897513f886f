"""Expanding one tensor along the dims that follow growing groups.

For every (tensor, dim) touched by a plan we build a *source map*: for each position of the new
dim, whether it is an old position (kept), a twin of an old unit (copied), or part of a new unit
(filled from the plan). The same maps remap optimizer state, so the two can never disagree.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..analysis.graph import Member
from ..errors import PlanError
from ..plan import GroupChange, values_for

OLD, TWIN, NEW = 0, 1, 2


@dataclass
class SourceMap:
    """Per new position along one dim: kind (OLD/TWIN/NEW) and the old position it copies (-1 for NEW)."""

    kind: torch.Tensor  # int64 [new_size]
    src: torch.Tensor  # int64 [new_size]

    @property
    def size(self) -> int:
        return int(self.kind.numel())


def unit_order(change: GroupChange) -> list[tuple[int, int]]:
    """The group's units after the change, as (kind, index): old unit i, twin of split i, new unit j."""
    width = change.group.width
    inserts: dict[int, list[tuple[int, int]]] = defaultdict(list)
    appended: list[tuple[int, int]] = []
    for si, s in enumerate(change.splits):
        if not 0 <= s.unit < width:
            raise PlanError(f"group {change.group.name!r}: split of unit {s.unit} but the width is {width}")
        (inserts[s.position] if s.position is not None and s.position < width else appended).append((TWIN, si))
    if change.new is not None:
        positions = change.new.positions
        if positions is not None and len(positions) != change.new.count:
            raise PlanError(f"group {change.group.name!r}: {change.new.count} new units but {len(positions)} positions")
        for j in range(change.new.count):
            p = positions[j] if positions is not None else None
            (inserts[p] if p is not None and p < width else appended).append((NEW, j))
    order: list[tuple[int, int]] = []
    for i in range(width):
        order += inserts.get(i, [])
        order.append((OLD, i))
    return order + appended


Expansion = tuple[int, SourceMap, torch.Tensor]  # (dim, source map, per-position multiplier)


@dataclass
class Segment:
    member: Member
    change: GroupChange
    order: list[tuple[int, int]]


def build_source_map(size: int, segments: list[Segment]) -> tuple[SourceMap, torch.Tensor]:
    """Source map of one dim and the multiplier of each new position (consumer halving)."""
    kinds: list[int] = []
    srcs: list[int] = []
    scales: list[float] = []
    p = 0
    last: GroupChange | None = None
    for seg in sorted(segments, key=lambda s: s.member.offset):
        m, ch = seg.member, seg.change
        end = m.offset + ch.group.width // m.per * m.inner
        if m.offset < p and last is not None and last.group.name != ch.group.name:
            raise PlanError(
                f"{m.tensor}: groups {last.group.name!r} and {ch.group.name!r} resize the same positions of dim "
                f"{m.dim} (an attention's heads and head_dim); grow them in separate plans"
            )
        last = ch
        if m.offset < p or end > size:
            raise PlanError(
                f"{m.tensor}: dim {m.dim} has size {size}, which does not fit group "
                f"{ch.group.name!r} (width {ch.group.width}); the plan is stale - re-analyse the model"
            )
        while p < m.offset:
            kinds.append(OLD), srcs.append(p), scales.append(1.0)
            p += 1
        copies = defaultdict(lambda: 1)
        for s in ch.splits:
            copies[s.unit] += 1
        for b in range(0, len(seg.order), m.per):
            kind, idx = seg.order[b]
            unit = idx if kind == OLD else ch.splits[idx].unit if kind == TWIN else -1
            if m.per > 1:
                _check_block(seg, b, m.per)
            scale = 1.0 / copies[unit] if (m.role == "consumer" and unit >= 0) else 1.0
            for r in range(m.inner):
                kinds.append(kind)
                srcs.append(m.offset + unit // m.per * m.inner + r if unit >= 0 else -1)
                scales.append(scale)
        p = end
    while p < size:
        kinds.append(OLD), srcs.append(p), scales.append(1.0)
        p += 1
    return SourceMap(torch.tensor(kinds), torch.tensor(srcs)), torch.tensor(scales, dtype=torch.float64)


def _check_block(seg: Segment, b: int, per: int) -> None:
    """Units `b .. b+per-1` of the new order must be one whole block (all old, all twins or all new, in order)."""
    ch = seg.change
    block = seg.order[b : b + per]

    def unit(k: int, i: int) -> int:
        return i if k == OLD else ch.splits[i].unit if k == TWIN else -1

    first_kind, first = block[0][0], unit(*block[0])
    ok = len(block) == per and all(k == first_kind for k, _ in block)
    if ok and first_kind != NEW:
        ok = first % per == 0 and [unit(*x) for x in block] == list(range(first, first + per))
    if not ok:
        raise PlanError(
            f"{seg.member.tensor}: group {ch.group.name!r} must grow by whole blocks of {per} units "
            "(split or add every unit of a block, in order, appended)"
        )


def gather(
    t: torch.Tensor,
    dim: int,
    smap: SourceMap,
    fill_new: bool = True,
    copy_twins: bool = True,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply a source map to `t` along `dim`: old and (if `copy_twins`) twin positions copy the old
    position (times `scale`, e.g. consumer halving), new positions are zero. Differentiable."""
    idx = smap.src.clamp(min=0).to(t.device)
    out = t.index_select(dim, idx)
    keep = smap.kind == OLD
    if copy_twins:
        keep = keep | (smap.kind == TWIN)
    mult = None
    if fill_new and not bool(keep.all()):
        mult = keep.to(torch.float64)
    if scale is not None and not bool((scale == 1).all()):
        mult = scale if mult is None else mult * scale
    if mult is not None and t.is_floating_point():
        shape = [1] * t.dim()
        shape[dim] = -1
        out = out * mult.to(device=t.device, dtype=t.dtype).view(shape)
    return out


def map_slice(value: torch.Tensor, done: list[Expansion], offset_dims: int = 0) -> torch.Tensor:
    """Bring a plan slice given in the old shape through the dims already expanded, transformed exactly
    like the tensor itself (twins copied, consumer splits halved, new positions zero)."""
    for dim, smap, scale in done:
        value = gather(value, dim + offset_dims, smap, scale=scale)
    return value


def default_fill(member: Member, shape: tuple[int, ...], like: torch.Tensor, init: str) -> torch.Tensor:
    """Values of new units for a member when the plan gives none."""
    kind = member.kind
    if kind in ("norm_weight", "running_var", "multiplicative"):
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    if (
        member.role == "passthrough"
        and kind == "weight"
        or (member.role == "producer" and kind in ("weight", "query") and init == "random")
    ):
        fan_in = max(1, math.prod(shape[2:]) if len(shape) > 2 else 1)
        if member.role == "producer":
            fan_in = max(1, math.prod(like.shape) // max(1, like.shape[member.dim]))
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(-bound, bound)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


# (dim, id(change), member) -> {(kind, index): first position of that unit along dim in the grown tensor}
UnitPositions = dict[tuple[int, int, Member], dict[tuple[int, int], int]]


def expand_tensor(
    old: torch.Tensor, edits: dict[int, list[Segment]], positions: UnitPositions | None = None
) -> tuple[torch.Tensor, list[Expansion]]:
    """The new value of one tensor after all group changes, and the source map of every expanded dim;
    `positions`, when given, receives where every segment's units landed (a constraint's completion edits
    them)."""
    t = old.detach()
    done: list[Expansion] = []
    for dim in sorted(edits):
        segs = edits[dim]
        smap, scale = build_source_map(t.shape[dim], segs)
        new = gather(t, dim, smap, copy_twins=True, scale=scale).clone()
        # positions of every unit in the new dim, per segment
        cursor = 0
        for seg in sorted(segs, key=lambda s: s.member.offset):
            m, ch = seg.member, seg.change
            # locate the segment's first position in the new dim: old positions before it are unchanged
            start = _new_start(smap, m.offset, cursor)
            unit_pos: dict[tuple[int, int], int] = {}
            for n, key in enumerate(seg.order):
                unit_pos[key] = start + n // m.per * m.inner
            cursor = start + len(seg.order) // m.per * m.inner
            if positions is not None:
                positions[(dim, id(ch), m)] = unit_pos
            slice_shape = list(old.shape)  # plan slices are given in the model's current (old) shape
            slice_shape[dim] = m.inner
            _fill_new_units(new, t, dim, m, ch, unit_pos, slice_shape, done)
            _perturb_splits(new, dim, m, ch, unit_pos, slice_shape, done, t)
        t = new
        done.append((dim, smap, scale))
    return t, done


def _new_start(smap: SourceMap, old_offset: int, cursor: int) -> int:
    # the first new position at or after `cursor` whose source is the segment's first old position
    kinds, srcs = smap.kind.tolist(), smap.src.tolist()
    for k in range(cursor, len(kinds)):
        if kinds[k] == OLD and srcs[k] == old_offset:
            return k
        if kinds[k] != OLD or srcs[k] > old_offset:
            return k
    return cursor


def _check(value: torch.Tensor, expected: list[int], what: str) -> None:
    if list(value.shape) != expected:
        raise PlanError(f"{what} has shape {list(value.shape)}, expected {expected}")


def _fill_new_units(new, old, dim, m, ch, unit_pos, slice_shape, done) -> None:
    if ch.new is None or ch.new.count == 0:
        return
    source = {"producer": ch.new.incoming, "consumer": ch.new.outgoing, "passthrough": ch.new.passthrough}.get(
        m.role, {}
    )
    count = ch.new.count
    given = values_for(source, m)
    if given is not None:
        value = given.to(device=old.device, dtype=old.dtype)
        _check(value, [count, *slice_shape], f"new units' values for {m.tensor}")
        value = map_slice(value, done, offset_dims=1)
    else:
        shape = [count, *slice_shape]
        for d, smap, _ in done:
            shape[d + 1] = smap.size
        value = default_fill(m, tuple(shape), old, ch.new.init)
    for j in range(count):
        p = unit_pos[(NEW, j)]
        new.narrow(dim, p, m.inner).copy_(value[j])


def _perturb_splits(new, dim, m, ch, unit_pos, slice_shape, done, old) -> None:
    if m.role == "consumer":  # directions are producer slices; a square layer that reads and writes the group
        return  # (in a residual loop) keeps its consumer columns halved, not perturbed
    for si, s in enumerate(ch.splits):
        d = values_for(s.directions, m)
        if d is None or s.eps == 0:
            continue
        d = d.to(device=old.device, dtype=old.dtype)
        _check(d, slice_shape, f"split direction for {m.tensor}")
        d = map_slice(d, done) * s.eps
        parent, twin = unit_pos[(OLD, s.unit)], unit_pos[(TWIN, si)]
        new.narrow(dim, parent, m.inner).add_(d)
        new.narrow(dim, twin, m.inner).sub_(d)


def remap_state(value: torch.Tensor, maps: list[Expansion]) -> torch.Tensor:
    """Optimizer state: old entries keep their values at their new positions, new entries (twins too) are zero."""
    out = value.detach()
    for dim, smap, _ in maps:
        out = gather(out, dim, smap, copy_twins=False)
    return out.clone()
