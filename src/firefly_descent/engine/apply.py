"""Apply a plan to a live model: the one place that physically changes models.

The edit is transactional: every replaced tensor, attribute, child module and optimizer entry is
logged, the model is run on example inputs before and after, and any failure (exception, shape
change, NaN, or output drift for a function-preserving plan) restores everything exactly.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ..analysis.graph import Constraint, Group, Member
from ..analysis.rules import (
    CONSTRAINT_CHECKS,
    CONSTRAINT_COMPLETIONS,
    STRUCTURAL,
    completion_order,
    completion_reason,
    load_optional_rules,
)
from ..errors import ApproximationRequiredError, GrowthError, PlanError, VerificationError
from ..layers import BLOCK_COPY_ATTR, Residual, ScaledBranch, Then, build_body
from ..plan import GroupChange, NewBranch, NewLayer, Plan
from . import optimizer as opt_utils
from .modules import attr_owners, rederive_attrs, restore_attrs, snapshot_attrs
from .tensors import NEW, OLD, TWIN, Expansion, Segment, UnitPositions, build_source_map, expand_tensor, unit_order

HISTORY_ATTR = "_firefly_history"


def growth_history(model: nn.Module) -> list[dict[str, Any]]:
    """The structural record (no tensors) of every plan applied to `model`, oldest first."""
    return list(getattr(model, HISTORY_ATTR, []))


def _owner(model: nn.Module, tensor: str) -> tuple[nn.Module, str, str]:
    mod_name, _, attr = tensor.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise PlanError(f"the plan refers to {tensor!r}, which the model does not have; re-analyse the model") from None
    if attr in module._parameters:
        return module, "_parameters", attr
    if attr in module._buffers:
        return module, "_buffers", attr
    raise PlanError(f"the plan refers to {tensor!r}, which the model does not have; re-analyse the model")


def validate(change: GroupChange, approximate: bool, model: nn.Module | None = None) -> None:
    """Refuse changes a group cannot take exactly unless the plan opted into approximation: each
    constraint is checked by the rule of the layer type that recorded it, and, given the model, new units
    whose completion cannot be exact there (a post-norm block) are refused before anything changes."""
    g: Group = change.group
    g.check_growable()
    n_new = change.new.count if change.new else 0
    split_units = [s.unit for s in change.splits]
    for c in g.constraints:
        check = CONSTRAINT_CHECKS.get(c.kind)
        if check is not None:
            check(c, g, split_units, n_new, approximate)
    if model is not None and n_new and not approximate:
        why = completion_reason(g, model)
        if why is not None:
            raise ApproximationRequiredError(why)


class _Transaction:
    """Undo log of everything an apply changed."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.tensors: list[tuple[dict[str, Any], str, Any]] = []
        self.attrs: list[tuple[nn.Module, dict[str, Any]]] = []
        self.children: list[tuple[nn.Module, str, nn.Module]] = []
        self.branches: list[nn.Module] = []  # modules that got a new branch (undone by remove_last_branch)
        self.optimizer = optimizer
        self.opt_snap = opt_utils.snapshot(optimizer) if optimizer is not None else None
        self.history = list(getattr(model, HISTORY_ATTR, []))

    def rollback(self) -> None:
        for target in reversed(self.branches):
            target.remove_last_branch()
        for parent, name, child in reversed(self.children):
            parent._modules[name] = child
        for store, name, old in reversed(self.tensors):
            store[name] = old
        for m, attrs in reversed(self.attrs):
            restore_attrs(m, attrs)
        if self.optimizer is not None and self.opt_snap is not None:
            opt_utils.restore(self.optimizer, self.opt_snap)
        setattr(self.model, HISTORY_ATTR, self.history)


def _inputs_for(model: nn.Module, example_inputs: Any, shapes: list[list[int]]) -> tuple[torch.Tensor, ...] | None:
    """The given example inputs, or seeded random ones of the shapes the plan recorded."""
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,)
        return tuple(example_inputs)
    if not shapes:
        return None
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        model.train(was_training)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


class Undo:
    """Takes back one applied plan: tensors, attributes, inserted layers, optimizer state and history.

    It also restores the values of every buffer the model had before the plan (BatchNorm running
    statistics that a later calibration or refresh changed in place). Valid until the model is grown again.
    """

    def __init__(self, tx: _Transaction, buffers: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor]]) -> None:
        self._tx, self._buffers, self.done = tx, buffers, False

    def __call__(self) -> None:
        if self.done:
            raise GrowthError("this growth step was already undone")
        self._tx.rollback()
        with torch.no_grad():
            for store, name, obj, value in self._buffers:
                if store.get(name) is obj:
                    obj.copy_(value)
        self.done = True


def apply_undoable(
    model: nn.Module,
    plan: Plan,
    optimizer: torch.optim.Optimizer | None = None,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    record: bool = True,
) -> Undo:
    """`apply`, returning an `Undo` that restores model, optimizer and buffers exactly (used to check a
    growth step on data and take it back, or to try several amplitudes of one plan)."""
    buffers = [
        (m._buffers, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    tx = _apply(model, plan, optimizer, example_inputs, verify, record)
    return Undo(tx, buffers)


def apply(
    model: nn.Module,
    plan: Plan,
    optimizer: torch.optim.Optimizer | None = None,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    record: bool = True,
) -> nn.Module:
    """Edit `model` in place as `plan` says; remap `optimizer`; verify on `example_inputs`; roll back on failure."""
    _apply(model, plan, optimizer, example_inputs, verify, record)
    return model


def _apply(
    model: nn.Module,
    plan: Plan,
    optimizer: torch.optim.Optimizer | None,
    example_inputs: Any,
    verify: bool,
    record: bool,
) -> _Transaction:
    load_optional_rules()  # the rules of the layers it edits (a replay may run before any analysis)
    for change in plan.changes:
        validate(change, plan.approximate, model)
    afters = [layer.after for layer in plan.layers]
    for a in afters:
        if afters.count(a) > 1 or any(o.startswith(a + ".") for o in afters):
            raise PlanError(f"new layers after {a!r} and inside it overlap; insert them in separate plans")
    inputs = _inputs_for(model, example_inputs, plan.input_shapes) if verify else None
    before = None
    if verify and inputs is not None:
        before = _flat(_run(model, inputs))
    tx = _Transaction(model, optimizer)
    try:
        positions = _apply_width(model, plan, optimizer, tx)
        _complete(model, plan, positions, tx)
        for layer in plan.layers:
            _insert_layer(model, layer, optimizer, tx)
        for branch in plan.branches:
            _add_branch(model, branch, optimizer, tx)
        if plan.values:
            _set_values(model, plan, tx)
        if verify and inputs is not None:
            _verify(model, plan, inputs, before)
    except GrowthError as e:
        tx.rollback()
        if isinstance(e, VerificationError):
            raise
        raise type(e)(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any failure inside torch becomes one clear line
        tx.rollback()
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VerificationError(
            f"applying the plan failed ({type(e).__name__}: {msg}); model and optimizer restored"
        ) from None
    if record:
        setattr(model, HISTORY_ATTR, tx.history + [plan.to_dict(tensors=False)])
    return tx


def _set_values(model: nn.Module, plan: Plan, tx: _Transaction) -> None:
    """The values a plan gives for tensors it resized, copied in inside the transaction (so a rollback or
    an undo takes them back with the resize). Only tensors this apply replaced may be set."""
    replaced = {(id(store), name) for store, name, _ in tx.tensors}
    with torch.no_grad():
        for tensor, value in plan.values.items():
            module, kind, attr = _owner(model, tensor)
            store = getattr(module, kind)
            if (id(store), attr) not in replaced:
                raise PlanError(f"the plan sets values of {tensor!r}, which it does not resize")
            current = store[attr]
            if tuple(current.shape) != tuple(value.shape):
                raise PlanError(f"the plan's values for {tensor!r} have shape {list(value.shape)}, "
                                f"the grown tensor {list(current.shape)}")
            current.copy_(value)


def _verify(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], before: list[torch.Tensor] | None) -> None:
    try:
        after = _flat(_run(model, inputs))
    except Exception as e:  # noqa: BLE001
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VerificationError(
            f"the grown model fails on the example inputs ({type(e).__name__}: {msg}); model and optimizer restored"
        ) from None
    if before is None:
        return
    if len(after) != len(before) or any(a.shape != b.shape for a, b in zip(after, before)):
        raise VerificationError("the grown model's output shape changed; model and optimizer restored")
    for a, b in zip(after, before):
        if a.is_floating_point() and not torch.isfinite(a).all() and torch.isfinite(b).all():
            raise VerificationError("the grown model outputs NaN/inf; model and optimizer restored")
        if plan.function_preserving and a.is_floating_point():
            drift = (a - b).abs().max().item() if a.numel() else 0.0
            limit = plan.tolerance * (1.0 + b.abs().max().item() if b.numel() else 1.0)
            if drift > limit:
                raise VerificationError(
                    f"plan declared function-preserving but outputs moved by {drift:.3g} (> {limit:.3g}); "
                    "model and optimizer restored"
                )


def plan_edits(plan: Plan) -> dict[str, dict[int, list[Segment]]]:
    """Per tensor and dim, the group segments a plan changes."""
    edits: dict[str, dict[int, list[Segment]]] = defaultdict(lambda: defaultdict(list))
    for change in plan.changes:
        if change.added == 0:
            continue
        order = unit_order(change)
        for m in change.group.members:
            edits[m.tensor][m.dim].append(Segment(m, change, order))
    return edits


def plan_expansions(model: nn.Module, plan: Plan) -> dict[str, list[Expansion]]:
    """The source maps `apply` will use for every tensor, computed without changing anything."""
    out: dict[str, list[Expansion]] = {}
    for tensor_name, dims in plan_edits(plan).items():
        module, store_name, attr = _owner(model, tensor_name)
        shape = list(getattr(module, store_name)[attr].shape)
        maps = []
        for dim in sorted(dims):
            smap, scale = build_source_map(shape[dim], dims[dim])
            shape[dim] = smap.size
            maps.append((dim, smap, scale))
        out[tensor_name] = maps
    return out


def _tie(model: nn.Module, edits: dict[str, dict[int, list[Segment]]]) -> dict[str, list[str]]:
    """Tensor names that are one object (an LM head tied to the token embedding), merged in `edits` under the
    first name: the tensor grows once and every name gets the grown one. Where a group's producer and
    consumer slices of a tied tensor coincide, the producer's are kept (the completion of a normalised stream
    makes them right for the reader too); a split cannot copy and halve one tensor at once, so it is refused."""
    names: dict[int, list[str]] = {}
    for name in list(edits):
        module, store_name, attr = _owner(model, name)
        obj = getattr(module, store_name)[attr]
        if obj is not None:
            names.setdefault(id(obj), []).append(name)
    tied = {ns[0]: ns for ns in names.values() if len(ns) > 1}
    for first, ns in tied.items():
        merged: dict[int, list[Segment]] = defaultdict(list)
        for n in ns:
            for dim, segs in edits.pop(n).items():
                merged[dim] += segs
        for dim, segs in merged.items():
            kept: dict[tuple[int, int], Segment] = {}
            for seg in sorted(segs, key=lambda sg: sg.member.role != "producer"):
                key = (id(seg.change), seg.member.offset)
                if key not in kept:
                    kept[key] = seg
                elif seg.change.splits:
                    raise PlanError(
                        f"{' and '.join(ns)} are one tied tensor that both writes and reads group "
                        f"{seg.change.group.name!r}: a split would copy and halve the same slice; add new units instead"
                    )
            merged[dim] = list(kept.values())
        edits[first] = dict(merged)
    return tied


def _apply_width(
    model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None, tx: _Transaction
) -> dict[str, UnitPositions]:
    """Resize every tensor the plan's groups touch; returns where each segment's units landed."""
    edits = plan_edits(plan)
    tied = _tie(model, edits)
    touched: dict[str, nn.Module] = {}
    positions: dict[str, UnitPositions] = {}
    for tensor_name, dims in edits.items():
        module, store_name, attr = _owner(model, tensor_name)
        store = getattr(module, store_name)
        old = store[attr]
        if old is None:
            continue
        positions[tensor_name] = {}
        with torch.no_grad():
            value, maps = expand_tensor(old, dims, positions[tensor_name])
        if store_name == "_parameters":
            new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
            if optimizer is not None:
                opt_utils.replace_param(optimizer, old, new, maps)
        else:
            new = value.contiguous()
        for name in tied.get(tensor_name, [tensor_name]):
            module, store_name, attr = _owner(model, name)
            mod_name = name.rpartition(".")[0]
            if mod_name not in touched:
                touched[mod_name] = module
                tx.attrs.append((module, snapshot_attrs(module)))
            store = getattr(module, store_name)
            tx.tensors.append((store, attr, old))
            store[attr] = new
            positions[name] = positions[tensor_name]
    _touch_owners(model, touched, tx)
    for module in touched.values():  # children first, then the modules whose attributes follow them
        before = next(a for m, a in tx.attrs if m is module)
        rederive_attrs(module, before)
    return positions


def _touch_owners(model: nn.Module, touched: dict[str, nn.Module], tx: _Transaction) -> None:
    """Add the ancestors of resized modules whose attributes follow their children (`attr_owners`), after
    them; their attributes are logged for rollback like the children's."""
    for parent, module in attr_owners(model, list(touched)):
        tx.attrs.append((module, snapshot_attrs(module)))
        touched[parent] = module


class _Grown:
    """The engine's side of `analysis.rules.GrownGroup`: one change's grown tensors, its units' positions, and
    attribute edits logged in the transaction."""

    def __init__(self, model: nn.Module, change: GroupChange, positions: dict[str, UnitPositions],
                 tx: _Transaction) -> None:
        self.model, self.change, self._positions, self._tx = model, change, positions, tx

    def tensor(self, name: str) -> torch.Tensor:
        module, store_name, attr = _owner(self.model, name)
        return getattr(module, store_name)[attr]

    def positions(self, member: Member, kind: str) -> torch.Tensor:
        try:
            where = self._positions[member.tensor][(member.dim, id(self.change), member)]
        except KeyError:
            raise PlanError(f"{member.tensor}: dim {member.dim} was not resized with group "
                            f"{self.change.group.name!r}") from None
        code = {"old": OLD, "twin": TWIN, "new": NEW}[kind]
        starts = [p for (k, i), p in sorted(where.items()) if k == code]
        return torch.tensor([[p + r for r in range(member.inner)] for p in starts], dtype=torch.long).view(
            len(starts), member.inner
        )

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name) if name else self.model

    def set_attr(self, module: nn.Module, attr: str, value: Any) -> None:
        self._tx.attrs.append((module, {attr: getattr(module, attr, None)}))
        setattr(module, attr, value)


def _complete(model: nn.Module, plan: Plan, positions: dict[str, UnitPositions], tx: _Transaction) -> None:
    """Each changed group's constraints complete the change exactly (`register_constraint(..., complete)`),
    once per constraint kind, after the resize and before the check; for an `approximate` plan only the
    structural ones (those that set module attributes)."""
    for change in plan.changes:
        if change.added == 0:
            continue
        kinds: dict[str, list[Constraint]] = defaultdict(list)
        for c in change.group.constraints:
            if c.kind in CONSTRAINT_COMPLETIONS and (not plan.approximate or c.kind in STRUCTURAL):
                kinds[c.kind].append(c)
        order = completion_order(list(kinds))
        if order is None:
            raise ApproximationRequiredError(
                f"group {change.group.name!r} carries constraints {sorted(kinds)} whose exact completions "
                "disagree; pass approximate=True"
            )
        for kind in order:
            CONSTRAINT_COMPLETIONS[kind](kinds[kind], _Grown(model, change, positions, tx))


def _insert_layer(model: nn.Module, layer: NewLayer, optimizer: torch.optim.Optimizer | None, tx: _Transaction) -> None:
    parent_name, _, child_name = layer.after.rpartition(".")
    if not child_name:
        raise PlanError("a new layer needs a submodule to follow; the model itself cannot be wrapped")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        child = parent._modules[child_name]
    except (AttributeError, KeyError):
        raise PlanError(f"no submodule {layer.after!r} to insert a layer after") from None
    ref = next(iter(child.parameters()), None)
    if ref is None:  # after a parameter-free module (a ReLU): the new layer lives where the model does
        ref = next(iter(model.parameters()), None)
    body = _copy_block(child, layer.spec) if layer.kind == "copy" else build_body(layer.spec)
    if ref is not None:
        body = body.to(device=ref.device, dtype=ref.dtype)
    if layer.params:
        own = body.state_dict()
        missing = [k for k in own if k not in layer.params]
        if missing:
            raise PlanError(f"new layer after {layer.after!r}: params miss {missing[:3]}")
        body.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in layer.params.items()})
    new: nn.Module = Residual(body, layer.scale) if layer.kind == "residual" else body
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    tx.children.append((parent, child_name, child))
    parent._modules[child_name] = Then(child, new)  # a Sequential whose first module may take several inputs
    if optimizer is not None:
        opt_utils.add_params(optimizer, list(new.parameters()), child)


def _copy_block(child: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """A new block (kind "copy"): a copy of `child` whose residual-branch outputs (`spec["zero"]`, names
    relative to the block) are zero, so `z -> block(z)` is the identity until they train."""
    block = copy.deepcopy(child)
    if hasattr(block, HISTORY_ATTR):
        delattr(block, HISTORY_ATTR)
    setattr(block, BLOCK_COPY_ATTR, True)  # `Then` calls it with its source's arguments (masks, positions)
    with torch.no_grad():
        for name in spec.get("zero", []):
            try:
                block.get_parameter(name).zero_()
            except AttributeError:
                raise PlanError(f"new block after a copy: it has no parameter {name!r}") from None
    return block


def _add_branch(model: nn.Module, branch: NewBranch, optimizer: torch.optim.Optimizer | None, tx: _Transaction) -> None:
    try:
        target = model.get_submodule(branch.into) if branch.into else model
    except AttributeError:
        raise PlanError(f"no submodule {branch.into!r} to add a branch into") from None
    if not (callable(getattr(target, "add_branch", None)) and callable(getattr(target, "remove_last_branch", None))):
        raise PlanError(
            f"module {branch.into!r} ({type(target).__name__}) does not sum branches: a new branch needs a module "
            "with add_branch()/remove_last_branch() (e.g. a DARTS cell node)"
        )
    ref = next(iter(target.parameters()), None)
    if ref is None:
        ref = next(iter(model.parameters()), None)
    body = build_body(branch.spec)
    if branch.params:
        own = body.state_dict()
        missing = [k for k in own if k not in branch.params]
        if missing:
            raise PlanError(f"new branch into {branch.into!r}: params miss {missing[:3]}")
        body.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in branch.params.items()})
    new = ScaledBranch(body, branch.scale)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    target.add_branch(new, **branch.args)
    tx.branches.append(target)
    if optimizer is not None:
        opt_utils.add_params(optimizer, list(new.parameters()), target)


def clone_structure(plan: Plan) -> Plan:
    """A copy of `plan` without its tensors: replays the same structure with default values."""
    return Plan.from_dict(copy.deepcopy(plan.to_dict(tensors=False)))
