"""TINY's amplitude γ (step 4 of `tiny.py`): the new neurons' weights at γ, the grown model simulated with
forward hooks on the unchanged one, the line search over γ, and the γ²·δW* edit of the existing consumer weights.

Apart from the closed form because it runs the model (many forwards per group) and must match what the engine
will build, not the statistics: the hooks here are tested to give the engine's grown model's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import as_inputs
from ._common import Context
from ._probe import layer_rule
from ._tiny_closed_form import TinyGroup
from ._tiny_paths import conv_nd


def new_weights(ctx: Context, tg: TinyGroup, ks: list[int], gamma: float) -> dict[str, torch.Tensor]:
    """Producer weight/bias and consumer weight of the new neurons `ks` at amplitude γ (live dtype)."""
    tp, model = tg.tpath, ctx.model
    prod = model.get_submodule(tp.path.producer)
    cons = model.get_submodule(tp.consumer)
    dt = prod.weight.dtype
    a = tg.alpha[ks] * gamma
    nw = int(prod.weight[0].numel())
    out = {"pw": a[:, :nw].reshape(len(ks), *prod.weight.shape[1:]).to(dt)}
    out["pb"] = a[:, nw].to(dt) if tp.path.bias else None
    om = (tg.omega[ks] * gamma).reshape(len(ks), -1, tp.k)  # [r, D_out, k]
    if tp.kind == "linear":
        out["cw"] = om[:, :, 0].transpose(0, 1).to(cons.weight.dtype)  # [D_out, r]
    else:
        kernel = tp.kernel if tp.flatten else cons.weight.shape[2:]  # flattened: a full-map 2-d kernel
        out["cw"] = om.transpose(0, 1).reshape(om.shape[1], len(ks), *kernel).to(cons.weight.dtype)
    return out


def _hooks(ctx: Context, tg: TinyGroup, ks: list[int], gamma: float, update_existing: bool) -> list[Any]:
    """Temporary forward hooks that add neurons `ks` of one group at amplitude γ to the unchanged model
    (and, with `update_existing`, γ²·δW* to its consumer): the model the engine will build."""
    tp = tg.tpath
    w = new_weights(ctx, tg, ks, gamma)
    modules = dict(ctx.model.named_modules())
    prod, act, cons = modules[tp.path.producer], tp.path.activation, modules[tp.consumer]
    prod_rule, cons_rule = layer_rule(prod), layer_rule(cons)
    state: dict[str, torch.Tensor] = {}
    delta = None
    if update_existing and gamma > 0:
        d = (tg.delta * gamma ** 2).to(cons.weight.dtype)
        has_b = tp.consumer_bias
        dw = d[:, :-1] if has_b else d
        delta = (dw.reshape(cons.weight.shape), d[:, -1] if has_b else None)

    def prod_hook(_m: nn.Module, inp: tuple[Any, ...], _o: Any) -> None:
        state["a"] = act(prod_rule.run_with(prod, inp[0], w["pw"], w["pb"]) * tp.bn_scale)

    def cons_hook(_m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        a = state.pop("a")
        if tp.flatten:  # a dense consumer of the flattened map: a convolution over the whole map
            extra = conv_nd(tp.spatial)(a, w["cw"], None, tp.stride, tp.padding, tp.dilation).reshape(out.shape)
        else:
            extra = cons_rule.run_with(cons, a, w["cw"], None)
        if delta is not None:
            extra = extra + cons_rule.run_with(cons, inp[0], delta[0], delta[1])
        return out + extra

    return [prod.register_forward_hook(prod_hook), cons.register_forward_hook(cons_hook)]


def virtual_loss(ctx: Context, tg: TinyGroup, ks: list[int], gamma: float,
                 fixed: Iterable[tuple[TinyGroup, list[int], float]] = (), *, batches: list[Any],
                 update_existing: bool) -> float:
    """Mean loss over `batches` with neurons `ks` of `tg` at amplitude γ, plus the already accepted
    groups `fixed` (group, neurons, γ), computed with hooks (tested to equal the engine's grown model)."""
    handles = []
    was = ctx.model.training
    total, count = 0.0, 0
    try:
        for g, k, gm in [*fixed, (tg, ks, gamma)]:
            handles += _hooks(ctx, g, k, gm, update_existing)
        ctx.model.eval()
        with torch.no_grad():
            for xb, yb in batches:
                total += float(ctx.loss_fn(ctx.model(*as_inputs(xb)), yb)) * yb.shape[0]
                count += int(yb.shape[0])
    finally:
        ctx.model.train(was)
        for h in handles:
            h.remove()
    return total / max(1, count)


def line_search(ctx: Context, tg: TinyGroup, ks: list[int],
                fixed: Iterable[tuple[TinyGroup, list[int], float]] = (), *, batches: list[Any],
                update_existing: bool, gamma_min: float, points: int, max_decades: int) -> tuple[float, float]:
    """(γ, loss) minimising the loss over `batches` on 0 ∪ a log grid from `gamma_min` (`points` per decade),
    extended by a decade while the best point is the largest one tried (at most `max_decades` extensions);
    the points tried go to `tg.line`."""
    fixed = list(fixed)
    lo = math.log10(gamma_min)
    grid = [0.0] + list(np.logspace(lo, 0.0, max(2, int(round(-lo * points)) + 1)))
    tried: dict[float, float] = {}
    for _ in range(max_decades + 1):
        for gm in grid:
            if gm not in tried:
                tried[gm] = virtual_loss(ctx, tg, ks, float(gm), fixed, batches=batches,
                                         update_existing=update_existing)
        best = min(tried, key=lambda g: (tried[g], g))
        top = max(tried)
        if best < top:
            break
        grid = list(np.logspace(math.log10(top), math.log10(top) + 1, points + 1))[1:]
    best = min(tried, key=lambda g: (tried[g], g))
    tg.line = {"gammas": sorted(tried), "losses": [tried[g] for g in sorted(tried)]}
    return float(best), tried[best]


def existing_update(ctx: Context, accepted: list[tuple[TinyGroup, list[int], float]]) -> Callable[[], None]:
    """A function adding γ²·δW* to the consumer weights of the grown groups once the engine has added the
    units (appended after the old inputs, so the old inputs are the first columns). Run inside the
    safeguard's step, the engine's undo takes it back with the units."""
    edits = []
    for tg, _, gamma in accepted:
        if gamma == 0.0:
            continue
        cons = ctx.model.get_submodule(tg.tpath.consumer)
        edits.append((tg.tpath.consumer, tg.tpath.consumer_bias, list(cons.weight.shape), tg.delta * gamma**2))

    def update() -> None:
        with torch.no_grad():
            for name, has_bias, old_shape, d in edits:
                cons = ctx.model.get_submodule(name)
                # the consumer may grow its own outputs in the same plan: old rows and columns come first
                if has_bias:
                    cons.bias.narrow(0, 0, old_shape[0]).add_(d[:, -1].to(cons.bias.dtype))
                    d = d[:, :-1]
                old = cons.weight.narrow(0, 0, old_shape[0]).narrow(1, 0, old_shape[1])
                old.add_(d.reshape(old_shape).to(cons.weight.dtype))

    return update
