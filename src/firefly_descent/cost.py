"""What a plan costs, from one FLOP count of the model and the plan's shapes: no model copy is grown.

Why: budgets in parameters or FLOPs, Firefly's new-layer costs and its exact-parameter trim used to apply
each option to a meta-device copy of the model and count again, five places per step. Here the model's
FLOPs are counted once (`flop_profile`, one sample through `torch.utils.flop_counter`, cached while the
model's structure stays the same), with each counted op attributed to the parameter it multiplies. A conv
or linear op costs c × numel(weight) (c = 2 × output positions), so growing a weight from n to n' elements
turns its op's FLOPs f into f·n'/n exactly; parameters follow from the tensors' grown shapes. New layers
are counted on their own (a residual body built on the meta device at the boundary's shape; a copied block
costs what the block costs). Whatever this model does not cover (an op with no weight operand, e.g.
attention's q·kᵀ, when the plan changes a width; new branches) falls back to the old measurement on a meta
copy, so the answer is always the measured one.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .analysis.graph import GrowthGraph
from .analysis.trace import as_input_tuple, meta_copy
from .engine.apply import apply, validate
from .errors import PlanError
from .layers import build_body
from .plan import Plan

# ops whose FLOPs are c × numel(weight) when the weight is the operand at this position (F.linear gives
# addmm(bias, x, wᵀ), x @ w gives mm(x, w), convolutions take (input, weight, ...))
_WEIGHT_ARG = {"mm": 1, "bmm": 1, "addmm": 2, "baddbmm": 2, "convolution": 1, "_convolution": 1}
# fused kernels that hide their matmuls from the counter (counted as 0 there, so a meta copy, which takes
# the unfused path, counts more): costs on such models are measured the old way
_OPAQUE = [
    getattr(torch.ops.aten, n)
    for n in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd")
    if hasattr(torch.ops.aten, n)
]



def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """The CPU's fused attention kernel: Q·Kᵀ and the weights times V, as torch counts its GPU kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


_sdpa_cpu_flops._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes the tensors themselves
# ops torch's counter has no formula for: the CPU's fused scaled-dot-product attention (Hugging Face models and
# F.scaled_dot_product_attention on the CPU run it; uncounted, their attention products would cost nothing)
EXTRA_FLOPS: dict[Any, Callable[..., int]] = {
    getattr(torch.ops.aten, n): _sdpa_cpu_flops
    for n in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(torch.ops.aten, n)
}


@contextlib.contextmanager
def _counted_paths() -> Iterator[None]:
    """Switch off nn.MultiheadAttention's and nn.TransformerEncoderLayer's inference fast path while counting:
    its fused kernels have no FLOP formula, the regular path (the one training runs) has."""
    mha = getattr(torch.backends, "mha", None)
    was = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(was)


@dataclass
class FlopProfile:
    """Per-sample forward FLOPs of a model, split by where they come from."""

    total: int
    by_param: dict[str, int] = field(default_factory=dict)  # ops whose weight operand is this parameter
    free: int = 0  # ops with no weight operand (attention's products, a matmul of two activations)
    opaque: int = 0  # fused ops the counter gives no FLOPs (nn.MultiheadAttention's inference fast path)
    modules: dict[str, int] = field(default_factory=dict)  # all ops run inside each module ("" = the model)
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-sample output shape of each module


@dataclass
class PlanCost:
    params: int  # parameters the plan adds (buffers excluded)
    flops: int  # per-sample forward FLOPs it adds
    measured: bool = False  # True when the analytic model did not cover the plan and a meta copy was grown


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, FlopProfile]] = weakref.WeakKeyDictionary()
MEASUREMENTS = {"profiles": 0, "meta_applies": 0}  # counters read by tests: how often a step really measures


def _signature(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """What FLOPs depend on: the module tree, the parameters' shapes and the inputs' per-sample shapes."""
    return (
        tuple((n, type(m)) for n, m in model.named_modules()),
        tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
        tuple(tuple(t.shape[1:]) for t in inputs),
    )


def flop_profile(model: nn.Module, example_inputs: Any) -> FlopProfile:
    """One sample of `example_inputs` through `model` (eval mode, no grad) under the FLOP counter, each op
    attributed to its weight parameter and to the modules it runs in. Cached per model while its structure
    (modules, parameter shapes, input shapes) is unchanged: training between growth steps keeps it valid."""
    inputs = as_input_tuple(example_inputs)
    sig = _signature(model, inputs)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    if any(p.is_meta for p in model.parameters()):  # as count_flops does: a meta model runs meta inputs
        run = [torch.empty_like(t, device="meta") for t in inputs]
    else:
        run = [t[:1] if t.dim() > 0 else t for t in inputs]
    profile = _measure(model, run)
    _CACHE[model] = (sig, profile)
    return profile


def _measure(model: nn.Module, run: list[torch.Tensor]) -> FlopProfile:
    MEASUREMENTS["profiles"] += 1
    owners: dict[int, tuple[str, int] | None] = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        key = p.untyped_storage().data_ptr()
        owners[key] = None if key in owners else (name, p.numel())  # sharing storage: not attributable
    stack: list[str] = [""]
    profile = FlopProfile(0)

    def record(op: str, count_fn: Callable[..., int]) -> Callable[..., int]:
        def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            flops = int(count_fn(*args, out_val=out_val, **kwargs))
            pos = _WEIGHT_ARG.get(op)
            w = args[pos] if pos is not None and pos < len(args) else None
            owner = owners.get(w.untyped_storage().data_ptr()) if isinstance(w, torch.Tensor) and owners else None
            if (
                owner is not None
                and w.numel() == owner[1]  # the whole parameter (a slice of it grows differently)
                and sum(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in owners for a in args) <= 2
            ):  # the weight (and at most a bias)
                profile.by_param[owner[0]] = profile.by_param.get(owner[0], 0) + flops
            else:
                profile.free += flops
            for name in set(stack):
                profile.modules[name] = profile.modules.get(name, 0) + flops
            return flops

        count._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes the tensors themselves
        return count

    ops = {**flop_registry, **EXTRA_FLOPS}
    mapping = {op: record(getattr(op, "__name__", str(op)).split(".")[-1], fn) for op, fn in ops.items()}

    def opaque(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        profile.opaque += 1
        return 0

    opaque._get_raw = True  # type: ignore[attr-defined]
    mapping.update({op: opaque for op in _OPAQUE if op not in mapping})
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            stack.append(name)

        def post(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            stack.pop()
            if isinstance(out, torch.Tensor) and name not in profile.outputs:
                profile.outputs[name] = tuple(out.shape[1:])

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    was = model.training
    model.eval()
    try:
        with counter, torch.no_grad(), _counted_paths():
            model(*run)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    batch = max(1, run[0].shape[0] if run and run[0].dim() > 0 else 1)
    profile.total = int(counter.get_total_flops() // batch)
    if batch > 1:  # per sample (FLOPs are linear in the batch)
        profile.free //= batch
        profile.by_param = {k: v // batch for k, v in profile.by_param.items()}
        profile.modules = {k: v // batch for k, v in profile.modules.items()}
    return profile


def grown_shapes(shapes: dict[str, tuple[int, ...]], plan: Plan) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors a plan's width changes resize (as the engine's source maps lay them out)."""
    out: dict[str, list[int]] = {}
    for change in plan.changes:
        validate(change, plan.approximate)
        if change.added == 0:
            continue
        w, n = change.group.width, change.added
        for m in change.group.members:
            if m.tensor not in shapes:
                continue
            if m.per > 1 and n % m.per:
                raise PlanError(f"{m.tensor}: group {change.group.name!r} must grow by whole blocks of {m.per} units")
            shape = out.setdefault(m.tensor, list(shapes[m.tensor]))
            shape[m.dim] += ((w + n) // m.per - w // m.per) * m.inner
    return {t: tuple(s) for t, s in out.items()}


def plan_cost(
    model: nn.Module, plan: Plan, example_inputs: Any, graph: GrowthGraph | None = None, flops: bool = True
) -> PlanCost:
    """Parameters and per-sample FLOPs that `plan` adds to `model`, from the model's FLOP profile and the
    plan's shapes; equal to growing a meta copy and counting (the fallback where the model does not cover
    the plan). `graph` gives new layers on a widened group their input width. `flops=False`: parameters
    only (no FLOP count at all; `flops` is then 0)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    new = grown_shapes(shapes, plan)
    if plan.branches:
        return _measured_plan_cost(model, plan, example_inputs)
    params = sum(math.prod(s) - math.prod(shapes[t]) for t, s in new.items())
    added = 0
    profile = flop_profile(model, example_inputs) if flops else None
    if profile is not None:
        if profile.opaque or (profile.free and new):
            return _measured_plan_cost(model, plan, example_inputs)
        for t, s in new.items():
            f = profile.by_param.get(t, 0)
            if f * math.prod(s) % math.prod(shapes[t]):
                return _measured_plan_cost(model, plan, example_inputs)  # not c × numel: not this model's op
            added += f * math.prod(s) // math.prod(shapes[t]) - f
    for layer in plan.layers:
        if layer.kind == "copy":  # a copy of block `after` as it is once the widths changed
            prefix = layer.after + "."
            params += sum(math.prod(new.get(t, s)) for t, s in shapes.items() if t.startswith(prefix))
            if profile is not None:
                if any(t.startswith(prefix) for t in new):  # the block's own ops at grown weights: not modelled
                    return _measured_plan_cost(model, plan, example_inputs)
                added += profile.modules.get(layer.after, 0)
            continue
        with torch.device("meta"):
            body = build_body(layer.spec)
        params += sum(p.numel() for p in body.parameters()) + (1 if layer.kind == "residual" else 0)
        if profile is None:
            continue
        widened = _widened_by(plan, layer.after, graph)
        shape = profile.outputs.get(layer.after)
        if shape is None or widened is None:
            return _measured_plan_cost(model, plan, example_inputs)
        grown = list(shape)
        if widened[1]:
            grown[widened[0] - 1] += widened[1]  # per-sample shape: the batch dim is left out
        added += _count(body, torch.empty((1, *grown), device="meta"))
    return PlanCost(params, added)


def _widened_by(plan: Plan, after: str, graph: GrowthGraph | None) -> tuple[int, int] | None:
    """(channel dim, units added) of the group a new layer after `after` sits on (0 units when the plan
    widens nothing there); None when that cannot be told without the analysis."""
    if not any(c.added for c in plan.changes):
        return (0, 0)
    if graph is None or after not in graph.boundaries:
        return None
    b = graph.boundaries[after]
    return (b.channel_dim, sum(c.added for c in plan.changes if c.group.name == b.group))


def _count(module: nn.Module, x: torch.Tensor) -> int:
    """Per-sample FLOPs of a meta-device module on a meta input of batch 1."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)
    module.eval()
    with counter, torch.no_grad(), _counted_paths():
        module(x)
    return int(counter.get_total_flops())


def _measured_plan_cost(model: nn.Module, plan: Plan, example_inputs: Any) -> PlanCost:
    """The reference (how costs were measured before): grow a meta copy by `plan`, count it, and subtract
    the live model's parameters and FLOPs (`count_flops` of one real sample)."""
    MEASUREMENTS["meta_applies"] += 1
    inputs = [torch.empty_like(t, device="meta") for t in as_input_tuple(example_inputs)]
    meta = meta_copy(model)
    apply(meta, plan, verify=False, record=False)
    params = sum(p.numel() for p in meta.parameters()) - sum(p.numel() for p in model.parameters())
    return PlanCost(params, count_flops(meta, inputs) - flop_profile(model, example_inputs).total, measured=True)


def count_flops(model: nn.Module, example_inputs: Any, per_sample: bool = True) -> int:
    """FLOPs of one forward pass (per sample by default), counted by `torch.utils.flop_counter`.

    A model on the meta device is counted as it is; a real model runs one sample (eval mode, no grad),
    which is much cheaper than deep-copying it to the meta device.
    """
    inputs = as_input_tuple(example_inputs)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        run = [torch.empty_like(t, device="meta") for t in inputs]
    else:
        run = [t[:1] if per_sample and t.dim() > 0 else t for t in inputs]
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)
    was = model.training
    model.eval()
    try:
        with counter, torch.no_grad(), _counted_paths():
            model(*run)
    finally:
        model.train(was)
    total = counter.get_total_flops()
    batch = run[0].shape[0] if run and run[0].dim() > 0 else 1
    return int(total // max(1, batch)) if per_sample else int(total)
